"""tools/eval_token_buckets.py end to end: per-bucket perplexity and per-domain loss of a small trained
checkpoint at TP=1, TP=2, PP=2 and DP=2 against an independent single-process computation, and clear
errors with a non-zero exit for bad input.

The reference shares neither the bucket code nor the evaluation loop: buckets from collections.Counter
(test_evaluation_token_buckets.reference_buckets), validation samples from megatron-core's own dataset
builder (its own index cache), logits from a plain forward pass and torch's full-vocabulary cross-entropy.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from megatron_mile.arguments import config_from_dict, parse_args
from megatron_mile.data.tokenizers import build_tokenizer
from megatron_mile.vocab import padded_vocab_size
from test_evaluation_token_buckets import read_documents, reference_buckets, write_dataset
from tiny_model import model_flags

REPO = Path(__file__).resolve().parents[1]
VOCAB = 100
SEQ = 16
DOMAINS = ("Github", "FreeLaw")


def write_tokenizer(path: Path, size: int) -> None:
    """A word-level tokenizer.json of `size` entries, id 0 = <|endoftext|> (the EOD the project looks for)."""
    from tokenizers import Tokenizer, models

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, size)}}
    Tokenizer(models.WordLevel(vocab, unk_token="w1")).save(str(path))


def zipf_documents(rng: random.Random, count: int, high_id: int = VOCAB) -> list:
    ids = list(range(1, high_id))
    rng.shuffle(ids)
    weights = [1.0 / (rank + 1) for rank in range(len(ids))]
    return [rng.choices(ids, weights=weights, k=rng.randrange(8, 60)) + [0] for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two domain datasets as --split-by-domain names them, a held-out set, foreign data, two tokenizers."""
    root = tmp_path_factory.mktemp("bucket_eval")
    rng = random.Random(11)
    write_tokenizer(root / "tokenizer.json", VOCAB)
    write_tokenizer(root / "other_tokenizer.json", 50)
    prefixes = {d: str(root / f"corpus_{d}_text_document") for d in DOMAINS}
    for prefix in prefixes.values():
        write_dataset(prefix, zipf_documents(rng, 60))
    held_out = str(root / "held_Github_text_document")
    write_dataset(held_out, zipf_documents(rng, 12))
    foreign = str(root / "foreign_text_document")
    write_dataset(foreign, zipf_documents(rng, 6, high_id=150))
    return {"root": root, "prefixes": prefixes, "held_out": held_out, "foreign": foreign}


def train_checkpoint(argv):
    """Worker body: a 3-step MiLe run that saves its checkpoint."""
    from megatron_mile.training.loop import pretrain

    return pretrain(parse_args(argv, world_size=1)).checkpoint


@pytest.fixture(scope="module")
def checkpoint(corpus, dist_pool):
    root = corpus["root"]
    data = []
    for prefix in corpus["prefixes"].values():
        data += ["0.5", prefix]
    argv = model_flags(num_layers=2, hidden_size=32, seq_length=16) + (
        "--init-method-std 0.25 --lr 1e-2 --micro-batch-size 2 --global-batch-size 4 --train-iters 3 "
        "--eval-iters 0 --log-interval 10 --no-progress --seed 5 --loss-type mile --split 80,20,0 "
        "--tokenizer-type HuggingFaceTokenizer"
    ).split() + ["--tokenizer-model", str(root / "tokenizer.json"), "--data-path", *data,
                 "--data-cache-path", str(root / "cache"), "--save", str(root / "ckpt")]
    dist_pool(1).run(train_checkpoint, argv)
    return str(root / "ckpt")


# ----------------------------------------------------------------------------------------------------------
# Worker bodies
# ----------------------------------------------------------------------------------------------------------


def run_main(argv):
    """Worker body: the tool's main() with its stdout and stderr captured: (exit code, stdout, stderr). The
    known harmless warnings are hidden first, as tools/eval_token_buckets.py does."""
    from megatron_mile import known_warnings
    from megatron_mile.evaluation.cli import main

    known_warnings.install()

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def reference_evaluation(checkpoint_dir, train_prefixes, valid_prefixes, split, cache_dir):
    """Worker body (one process): per (domain, bucket) [ce sum, tokens] by plain full-vocabulary torch ops."""
    import torch
    import torch.nn.functional as F
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_mile.model import build_model
    from megatron_mile import checkpointing
    from megatron_mile.training.initialize import set_random_seeds

    config = config_from_dict(checkpointing.read_saved_config(checkpoint_dir))
    config.finalize(1)
    set_random_seeds(config.training.seed)  # megatron's model-parallel RNG tracker (dropout streams)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=config.data.tokenizer_model)
    model = build_model(config, VOCAB)
    checkpointing.load_model_weights(checkpoint_dir, model)
    model = model[0].eval()

    # Buckets: a Counter over the training split's documents (megatron rounds the split boundary).
    counter = Counter()
    train_fraction = float(split.split(",")[0]) / sum(float(x) for x in split.split(","))
    for prefix in train_prefixes:
        documents = read_documents(prefix)
        for document in documents[: int(round(train_fraction * len(documents)))]:
            counter.update(document)
    bucket_of = reference_buckets(counter, VOCAB)

    sums = {}
    for prefix in valid_prefixes:
        dataset_config = GPTDatasetConfig(
            random_seed=config.training.seed, sequence_length=SEQ, blend=([prefix], None),
            split=split if prefix in train_prefixes else "0,100,0", tokenizer=tokenizer,
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, path_to_cache=cache_dir,
        )
        valid = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, dataset_config).build()[1]
        samples = [valid[i] for i in range(len(valid))]
        tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])  # [n, s]
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])  # [n, s]
        mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]) > 0
        positions = torch.arange(SEQ).expand_as(tokens)
        with torch.no_grad():
            logits = model(tokens, positions, None)[..., :VOCAB].double()  # [n, s, V]
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        per_bucket = [[0.0, 0] for _ in range(3)]
        for value, label, keep in zip(ce.tolist(), labels.reshape(-1).tolist(), mask.reshape(-1).tolist()):
            if keep:
                per_bucket[bucket_of[label]][0] += value
                per_bucket[bucket_of[label]][1] += 1
        sums[prefix] = per_bucket
    return sums


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


def assert_report_matches(report: dict, reference: dict, names: dict) -> None:
    """names: prefix -> domain name in the report."""
    buckets = ("high", "medium", "low")
    for prefix, per_bucket in reference.items():
        domain = report["domains"][names[prefix]]
        for index, bucket in enumerate(buckets):
            ce_sum, tokens = per_bucket[index]
            ours = domain["buckets"][bucket]
            assert ours["tokens"] == tokens, (prefix, bucket)
            if tokens:
                assert math.isclose(ours["loss"], ce_sum / tokens, rel_tol=2e-5), (prefix, bucket, ours, ce_sum / tokens)
        all_tokens = sum(t for _, t in per_bucket)
        assert domain["tokens"] == all_tokens
        assert math.isclose(domain["loss"], sum(c for c, _ in per_bucket) / all_tokens, rel_tol=2e-5)
    for index, bucket in enumerate(buckets):
        ce_sum = sum(per_bucket[index][0] for per_bucket in reference.values())
        tokens = sum(per_bucket[index][1] for per_bucket in reference.values())
        row = next(r for r in report["buckets"] if r["bucket"] == bucket)
        assert row["tokens"] == tokens
        assert math.isclose(row["perplexity"], math.exp(ce_sum / tokens), rel_tol=5e-5), (bucket, row)


@pytest.fixture(scope="module")
def reference(corpus, checkpoint, dist_pool, tmp_path_factory):
    prefixes = list(corpus["prefixes"].values())
    cache = str(tmp_path_factory.mktemp("reference_cache"))
    return dist_pool(1).run(reference_evaluation, checkpoint, prefixes, prefixes, "80,20,0", cache)[0]


LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2": (2, ["--micro-batch-size", "3"]),  # 3 does not divide the sample counts: padding is exercised
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bucket_perplexity_matches_the_reference(dist_pool, corpus, checkpoint, reference, tmp_path, layout):
    world, flags = LAYOUTS[layout]
    output = tmp_path / "buckets.json"
    results = dist_pool(world).run(run_main, ["--load", checkpoint, "--output-json", str(output), *flags])
    assert [code for code, _, _ in results] == [0] * world, results
    report = json.loads(output.read_text())
    names = {prefix: domain for domain, prefix in corpus["prefixes"].items()}
    assert_report_matches(report, reference, names)
    assert report["iteration"] == 3 and report["loss_type"] == "mile"
    # MiLe's parameters as trained (the flags' defaults, gamma 1 and sigma 1; no entropy threshold).
    assert report["loss_settings"] == {"gamma": 1.0, "sigma": 1.0}
    # The bucket rows describe the 80/15/5 split of the training occurrences.
    shares = [row["training_fraction"] for row in report["buckets"]]
    assert shares[0] >= 0.8 and shares[0] + shares[1] >= 0.95 and math.isclose(sum(shares), 1.0)
    # The last rank prints the table; it names every bucket and domain.
    table = results[-1][1]
    for word in ("high", "medium", "low", "Github", "FreeLaw"):
        assert word in table


def test_held_out_data_is_scored_whole(dist_pool, corpus, checkpoint, tmp_path, tmp_path_factory):
    train = list(corpus["prefixes"].values())
    held_out = corpus["held_out"]
    cache = str(tmp_path_factory.mktemp("reference_cache_held_out"))
    expected = dist_pool(1).run(reference_evaluation, checkpoint, train, [held_out], "80,20,0", cache)[0]
    output = tmp_path / "held.json"
    code, _, err = dist_pool(1).run(run_main, ["--load", checkpoint, "--valid-data-path", held_out,
                                              "--output-json", str(output)])[0]
    assert code == 0, err
    report = json.loads(output.read_text())
    assert list(report["domains"]) == ["Github"]
    assert_report_matches(report, expected, {held_out: "Github"})


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_give_one_clear_error_and_exit_1(dist_pool, corpus, checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    (damaged / "latest_checkpointed_iteration.txt").write_text("three\n")
    no_shard = tmp_path / "no_shard"
    shutil.copytree(checkpoint, no_shard)
    for shard in no_shard.glob("iter_*/*.distcp"):
        shard.unlink()
    cases = [
        (["--load", str(tmp_path / "missing")], r"checkpoint directory .*missing does not exist"),
        (["--load", str(damaged)], r"should hold one iteration number but holds 'three'"),
        (["--load", str(no_shard)], r"cannot load .*no_shard/iter_0000003"),
        (["--load", checkpoint, "--valid-data-path", corpus["foreign"]],
         r"foreign_text_document' holds token id 14\d, but the model's vocabulary has 100 entries"),
        (["--load", checkpoint, "--tokenizer-model", str(corpus["root"] / "other_tokenizer.json")],
         r"has 50 entries, the checkpoint was trained with a 100-token vocabulary"),
        (["--load", checkpoint, "--data-path", str(tmp_path / "nothing")], r"--data-path prefix .*nothing' has no"),
        (["--load", checkpoint, "--bucket-fractions", "0.5", "0.4"], r"must be positive and sum to 1"),
    ]
    for argv, message in cases:
        output = tmp_path / "never.json"
        code, _, err = dist_pool(1).run(run_main, argv + ["--output-json", str(output)])[0]
        assert code == 1, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(message, err), (message, err)
        assert not output.exists()


def test_evaluation_pads_the_vocabulary_like_the_checkpoint_at_any_tp(checkpoint):
    # 100 tokens were padded to 128 rows at TP=1; at TP=2 the default multiple would pad to 256.
    from megatron_mile.evaluation.cli import BucketEvalConfig, EvaluationError, run_config_for
    from megatron_mile.checkpointing import read_checkpoint_metadata

    metadata = read_checkpoint_metadata(checkpoint)
    assert metadata["vocab"] == {"padded": 128, "real": VOCAB}
    config = run_config_for(BucketEvalConfig(load=checkpoint, tensor_model_parallel_size=2), metadata["config"],
                            metadata["vocab"], 2)
    assert padded_vocab_size(VOCAB, 2, config.model.make_vocab_size_divisible_by) == 128
    with pytest.raises(EvaluationError, match="128 rows .* --tensor-model-parallel-size 3 does not divide"):
        run_config_for(BucketEvalConfig(load=checkpoint, tensor_model_parallel_size=3), metadata["config"],
                       metadata["vocab"], 3)


def test_the_tool_exits_non_zero_with_a_message_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_token_buckets.py"), "--load", str(tmp_path / "none")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 1
    assert "eval_token_buckets.py: error: checkpoint directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "eval_token_buckets.py")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--load <checkpoint directory> is required" in proc.stderr


def test_damaged_data_and_pickled_index_caches_stop_the_evaluation(dist_pool, corpus, checkpoint, tmp_path):
    """Datasets and caches handed to the tool are data: a pickled cache is refused unopened, a truncated .bin
    is named, each in one line with exit code 1."""
    import pickle

    from test_data_index_cache import CreatesFileWhenUnpickled

    held = str(tmp_path / "held_Github_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(corpus["held_out"] + ext, held + ext)
    cache = tmp_path / "cache"
    argv = ["--load", checkpoint, "--valid-data-path", held, "--data-cache-path", str(cache)]
    code, _, err = dist_pool(1).run(run_main, argv)[0]
    assert code == 0, err
    marker = tmp_path / "code_ran"
    poisoned = sorted(cache.glob("*.npy"))
    assert poisoned
    for path in poisoned:
        path.write_bytes(pickle.dumps(CreatesFileWhenUnpickled(marker)))
    code, _, err = dist_pool(1).run(run_main, argv)[0]
    assert code == 1 and not marker.exists()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(r"dataset index cache .*\.npy is not a \.npy array file", err), err

    with open(held + ".bin", "r+b") as f:
        f.truncate(10)
    code, _, err = dist_pool(1).run(run_main, argv)[0]
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{held}.bin: truncated" in err
