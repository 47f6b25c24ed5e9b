"""Export to Hugging Face: a checkpoint saved at TP=2 x PP=2 (GQA, padded vocabulary, non-default rope base)
is exported by tools/export_hf.py and loaded with transformers' own LlamaForCausalLM, whose logits must match
our model's (the saving layout's forward, and a single-process forward of the loaded weights) within 1e-4.
Also: the tokenizer files encode like the run's tokenizer, bad inputs fail clearly with nothing written,
and lm-evaluation-harness evaluates the exported model offline on the tiny task shipped in examples/.

The reference implementation is transformers' (an independent Llama): a wrong QKV split, gate/up order,
norm mapping, rope convention, epsilon or vocabulary slice would show up as a logit difference.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mile.arguments import config_to_dict
from megatron_mile.config import DataConfig, ModelConfig, RunConfig
from megatron_mile.data.tokenizers import HuggingFaceTokenizer
from megatron_mile.export.cli import export_main
from megatron_mile.export.hf_llama import ExportError, to_hf_state_dict
from megatron_mile.export.hf_tokenizer import prepare_tokenizer, write_tokenizer_files
from tiny_model import build_tiny_model, layout_logits, model_flags, tiny_config

# Nothing may be downloaded: huggingface_hub reads these when it is imported (by transformers below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "sample" / "tokenizer.json"
VOCAB = 8192  # the sample tokenizer's size
SEQ = 16
BATCH = 2
ITERATION = 7
TASKS = REPO / "examples" / "lm_eval_tasks"


def make_config(group_query_attention=True, tied=False):
    """A 4-layer LLaMA (GQA: 2 query heads per KV head) on the sample tokenizer, at this worker's layout."""
    flags = model_flags(num_layers=4, hidden_size=64, seq_length=SEQ, untie_embeddings=not tied) + [
        "--ffn-hidden-size", "96",
        "--max-position-embeddings", "128",  # the longest lm-eval request fits: no truncated contexts to mirror
        "--rotary-base", "1000",  # not Llama's default 10000: a dropped rope_theta changes the logits
        # 8192 tokens pad to 8200 rows at TP 2 (multiple of 2 * 100): the export must drop the 8 padded rows.
        "--make-vocab-size-divisible-by", "100",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(TOKENIZER), "--seed", "11",
    ]
    if group_query_attention:
        flags += ["--group-query-attention", "--num-query-groups", "2"]
    return tiny_config(flags, validate=False)  # a model to save and export: no training data to name


def tokens():
    generator = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)


def _perturb_norms(chunks):
    """Give every RMSNorm weight distinct values (fresh ones are all 1, which would hide a swapped or
    missing norm). The values depend on the parameter name and pipeline rank only, so the replicas of a
    norm on the TP ranks stay equal, as they are in training."""
    from megatron.core import parallel_state

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    with torch.no_grad():
        for chunk in chunks:
            for index, (name, param) in enumerate(sorted(chunk.named_parameters())):
                if "layernorm" in name:
                    generator = torch.Generator().manual_seed(1000 * pp_rank + index)
                    param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=generator))


def worker_save(directory, group_query_attention=True, tied=False):
    """Build the model at this worker's layout, give its norms distinct values, save it, return its logits."""
    from megatron_mile import checkpointing

    config = make_config(group_query_attention, tied)
    chunks = build_tiny_model(config, VOCAB)
    _perturb_norms(chunks)
    checkpointing.save_checkpoint(directory, ITERATION, chunks, None, None, 0, config_to_dict(config))
    return layout_logits(chunks, tokens())


def worker_single_process_logits(directory):
    """Our model, rebuilt at TP=1/PP=1 from the checkpoint alone (as the export loads it), on the same input."""
    from megatron_mile.export import checkpoint

    model = checkpoint.load_single_process_model(directory, checkpoint.read_metadata(directory))
    model.eval()
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    with torch.no_grad():
        return model(tokens(), positions, None)  # [b, s, V_padded]


def run_export(*args, cwd=REPO):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(dist_pool, tmp_path_factory):
    """(checkpoint dir, exported dir, logits of the TP=2 x PP=2 model that saved the checkpoint)."""
    root = tmp_path_factory.mktemp("export")
    checkpoint_dir, output = root / "checkpoint", root / "hf"
    per_rank = dist_pool(4).run(worker_save, str(checkpoint_dir), tensor_model_parallel_size=2,
                                pipeline_model_parallel_size=2)
    reference = next(r for r in per_rank if r is not None)  # [b, s, V_padded]
    result = run_export("--load", checkpoint_dir, "--output", output)
    assert result.returncode == 0, result.stderr
    assert "iteration 7" in result.stdout and "8192 of 8200 padded rows" in result.stdout, result.stdout
    return checkpoint_dir, output, reference


def hf_model(directory):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_hf_logits_match_ours(exported, dist_pool):
    checkpoint_dir, output, reference = exported
    assert reference.shape == (BATCH, SEQ, 8200)
    config = json.loads((output / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["num_key_value_heads"] == 2 and not config["tie_word_embeddings"]
    assert config["rope_theta"] == 1000 and config["rms_norm_eps"] == 1e-5
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                       "tokenizer_config.json"]
    assert not [p for p in output.parent.iterdir() if ".tmp-" in p.name]

    model = hf_model(output)
    assert model.config.rope_parameters["rope_theta"] == 1000
    with torch.no_grad():
        theirs = model(tokens()).logits  # [b, s, V]
    assert theirs.shape == (BATCH, SEQ, VOCAB)
    ours = reference[..., :VOCAB]
    assert ours.abs().max() > 0.1  # not a degenerate model whose logits all agree trivially
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    # The single-process forward of the same checkpoint (how the export reads it) agrees too.
    single = dist_pool(1).run(worker_single_process_logits, str(checkpoint_dir))[0]
    torch.testing.assert_close(single, reference, atol=1e-5, rtol=0)


def worker_export(directory, output):
    """The export called in a process that already has a group and TP=1/PP=1 state (they are reused)."""
    from megatron_mile.export.hf_directory import export_checkpoint

    export_checkpoint(directory, output)


def test_tied_embeddings_without_gqa(dist_pool, tmp_path):
    """TP=2, one KV head per query head, output layer sharing the embedding: lm_head gets the embedding."""
    checkpoint_dir, output = tmp_path / "checkpoint", tmp_path / "hf"
    reference = dist_pool(2).run(worker_save, str(checkpoint_dir), False, True, tensor_model_parallel_size=2)[0]
    dist_pool(1).run(worker_export, str(checkpoint_dir), str(output))
    model = hf_model(output)
    assert model.config.num_key_value_heads == 4 and not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight, atol=0, rtol=0)
    with torch.no_grad():
        theirs = model(tokens()).logits
    torch.testing.assert_close(theirs, reference[..., :VOCAB], atol=1e-4, rtol=0)


def test_exported_files_get_the_umask_mode(exported):
    """Every exported file has the mode open() gives a new file (safetensors alone would write 0600)."""
    _, output, _ = exported
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in output.iterdir()}
    assert "model.safetensors" in modes
    assert modes == {name: 0o666 & ~umask for name in modes}


def test_exported_tokenizer_encodes_like_the_runs(exported):
    from transformers import AutoTokenizer

    _, output, _ = exported
    theirs = AutoTokenizer.from_pretrained(output)
    ours = HuggingFaceTokenizer(str(TOKENIZER))
    text = "The quick brown fox jumps over the lazy dog.\nPile: 12345 tokens, naïve café."
    assert theirs(text)["input_ids"] == ours.tokenize(text)  # no BOS or EOS added
    assert theirs.eos_token_id == ours.eod and theirs.eos_token == "<|endoftext|>"
    assert theirs.decode(ours.tokenize(text)) == ours.detokenize(ours.tokenize(text))
    assert json.loads((output / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def _tokenizer_with_post_processor(tmp_path, post_processor) -> Path:
    """The sample tokenizer.json with another post-processor (as LLaMA's tokenizers add a BOS)."""
    data = json.loads(TOKENIZER.read_text())
    data["post_processor"] = post_processor
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return path


BOS_TEMPLATE = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}


@pytest.mark.parametrize("post_processor", [BOS_TEMPLATE, {"type": "Sequence", "processors": [BYTE_LEVEL, BOS_TEMPLATE]}],
                         ids=["template", "sequence"])
def test_a_tokenizer_that_adds_a_bos_is_exported_encoding_as_trained(tmp_path, post_processor):
    """Training encodes without added special tokens; transformers (and lm-eval) with them: the exported
    tokenizer must give the training ids by default."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    source = _tokenizer_with_post_processor(tmp_path, post_processor)
    text = "The quick brown fox jumps over the lazy dog.\nPile: 12345 tokens."
    assert Tokenizer.from_file(str(source)).encode(text).ids[0] == 0  # the source does add a BOS
    ours = HuggingFaceTokenizer(str(source))
    prepared = prepare_tokenizer(DataConfig(), str(source), VOCAB)
    output = tmp_path / "export"
    output.mkdir()
    write_tokenizer_files(output, prepared, 128)
    theirs = AutoTokenizer.from_pretrained(output)
    assert theirs(text)["input_ids"] == ours.tokenize(text)


def test_the_sample_tokenizer_names_its_end_of_document_token():
    """Megatron-LM's HuggingFaceTokenizer (transformers' AutoTokenizer) finds EOS through tokenizer_config.json."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(TOKENIZER.parent)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == HuggingFaceTokenizer(str(TOKENIZER)).eod
    text = "def f(x):\n    return x + 1"
    assert theirs(text)["input_ids"] == HuggingFaceTokenizer(str(TOKENIZER)).tokenize(text)


# ----------------------------------------------------------------------------------------------------------
# lm-evaluation-harness, offline, on the tiny task shipped in examples/lm_eval_tasks
# ----------------------------------------------------------------------------------------------------------


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def worker_reference_loglikelihoods(directory, pairs, texts):
    """With our own model (single process) and our own tokenizer, what lm-eval computes through the export:

    - per (context, continuation): sum of log p(continuation tokens | context), the continuation's tokens
      being those of tokenize(context + continuation) after tokenize(context)'s (lm-eval's split);
    - per text: the rolling log-likelihood of all its tokens after the end-of-document token.
    """
    from megatron_mile.export import checkpoint

    tokenizer = HuggingFaceTokenizer(str(TOKENIZER))
    model = checkpoint.load_single_process_model(directory, checkpoint.read_metadata(directory))
    model.eval()

    def logprob(whole, scored):
        """Sum of log p(whole[i] | whole[:i]) over the last `scored` tokens of `whole`."""
        inputs = torch.tensor([whole[:-1]])
        with torch.no_grad():
            logits = model(inputs, torch.arange(inputs.shape[1]).unsqueeze(0), None)[0, :, :VOCAB]  # [s, V]
        logprobs = torch.log_softmax(logits.double(), dim=-1)[-scored:]
        return float(logprobs[torch.arange(scored), torch.tensor(whole[-scored:])].sum())

    choices = []
    for context, continuation in pairs:
        context_ids = tokenizer.tokenize(context)
        continuation_ids = tokenizer.tokenize(context + continuation)[len(context_ids):]
        choices.append(logprob(context_ids + continuation_ids, len(continuation_ids)))
    rolling = []
    for text in texts:
        ids = tokenizer.tokenize(text)
        rolling.append(logprob([tokenizer.eod] + ids, len(ids)))
    return choices, rolling


def test_lm_eval_runs_offline_on_the_export(exported, dist_pool, tmp_path):
    checkpoint_dir, output, _ = exported
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={output},dtype=float32",
               "--tasks", "mile_tiny,mile_tiny_ppl", "--include_path", str(TASKS), "--device", "cpu",
               "--batch_size", "8", "--output_path", str(tmp_path / "results"), "--log_samples"]
    # From the repository root: the task YAMLs name their data files relative to it (as the README says).
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    report = json.loads(results_file.read_text())
    assert report["n-samples"]["mile_tiny"] == {"original": 10, "effective": 10}
    assert report["n-samples"]["mile_tiny_ppl"] == {"original": 5, "effective": 5}
    (samples_file,) = (tmp_path / "results").rglob("samples_mile_tiny_2*.jsonl")
    samples = sorted(read_jsonl(samples_file), key=lambda s: s["doc_id"])
    docs = read_jsonl(TASKS / "mile_tiny" / "mile_tiny.jsonl")
    assert [s["doc"] for s in samples] == docs

    # lm-eval's request for choice c of doc d is (question, " " + c).
    pairs = [(doc["question"], " " + choice) for doc in docs for choice in doc["choices"]]
    texts = [row["text"] for row in read_jsonl(TASKS / "mile_tiny" / "mile_tiny_ppl.jsonl")]
    ours, rolling = dist_pool(1).run(worker_reference_loglikelihoods, str(checkpoint_dir), pairs, texts)[0]

    theirs = [float(ll) for s in samples for ll, _ in s["filtered_resps"]]
    assert theirs == pytest.approx(ours, abs=1e-4)
    position = 0
    expected_correct = []
    for doc in docs:
        scores = ours[position:position + len(doc["choices"])]
        position += len(doc["choices"])
        expected_correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert report["results"]["mile_tiny"]["acc,none"] == pytest.approx(sum(expected_correct) / len(docs))

    # Bits per byte over the whole text task: -sum(log-likelihood) / (bytes * ln 2).
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    expected_bpb = -sum(rolling) / n_bytes / math.log(2)
    assert report["results"]["mile_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error, exit code 1, nothing written (no process group or weights needed)
# ----------------------------------------------------------------------------------------------------------


def fake_checkpoint(directory, llama=True, iteration=3):
    """A save directory whose checkpoint holds only its description (enough for every check before loading)."""
    from megatron_mile import checkpointing

    config = RunConfig()
    m, t = config.model, config.training
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, t.micro_batch_size = 2, 128, 4, 128, 1
    if llama:
        m = config.model
        m.normalization, m.swiglu, m.disable_bias_linear, m.position_embedding_type = "RMSNorm", True, True, "rope"
    config.data.tokenizer_type, config.data.tokenizer_model = "HuggingFaceTokenizer", str(TOKENIZER)
    config.finalize(1)
    path = Path(directory) / checkpointing.checkpoint_name(iteration)
    path.mkdir(parents=True)
    metadata = {"format": checkpointing.FORMAT, "format_version": checkpointing.FORMAT_VERSION,
                "iteration": iteration, "config": config_to_dict(config), "vocab": {"real": VOCAB, "padded": 8192}}
    (path / checkpointing.METADATA_FILENAME).write_text(json.dumps(metadata))
    (Path(directory) / checkpointing.TRACKER_FILENAME).write_text(f"{iteration}\n")
    return Path(directory)


def export_fails(capsys, *args):
    assert export_main([str(a) for a in args]) == 1
    return capsys.readouterr().err


def test_missing_checkpoint_directory(tmp_path, capsys):
    error = export_fails(capsys, "--load", tmp_path / "nope", "--output", tmp_path / "out")
    assert "does not exist" in error and str(tmp_path / "nope") in error
    assert not (tmp_path / "out").exists()


def test_directory_without_latest_pointer(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    error = export_fails(capsys, "--load", tmp_path / "ckpt", "--output", tmp_path / "out")
    assert "no checkpoint" in error and "latest_checkpointed_iteration.txt" in error
    fake_checkpoint(tmp_path / "other")
    (tmp_path / "other" / "latest_checkpointed_iteration.txt").unlink()
    error = export_fails(capsys, "--load", tmp_path / "other", "--output", tmp_path / "out")
    assert "iter_0000003" in error and "latest_checkpointed_iteration.txt" in error
    error = export_fails(capsys, "--load", tmp_path / "other", "--iteration", "5", "--output", tmp_path / "out")
    assert "iter_0000005" in error
    assert not (tmp_path / "out").exists()


def test_non_llama_checkpoint_is_refused(tmp_path, capsys):
    checkpoint_dir = fake_checkpoint(tmp_path / "ckpt", llama=False)
    error = export_fails(capsys, "--load", checkpoint_dir, "--output", tmp_path / "out")
    assert "not a LLaMA-architecture model" in error
    for problem in ("LayerNorm", "GeLU", "biases", "learned_absolute"):
        assert problem in error, (problem, error)
    assert not (tmp_path / "out").exists()


def test_output_and_tokenizer_problems(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    checkpoint_dir = fake_checkpoint(tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier work")
    error = export_fails(capsys, "--load", checkpoint_dir, "--output", tmp_path / "out")
    assert "not empty" in error and "--overwrite" in error
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier work"

    small = tmp_path / "small.json"
    Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a")).save(str(small))
    error = export_fails(capsys, "--load", checkpoint_dir, "--output", tmp_path / "new", "--tokenizer", small)
    assert "has 2 tokens, the checkpoint's model 8192" in error
    error = export_fails(capsys, "--load", checkpoint_dir, "--output", tmp_path / "new", "--tokenizer",
                         tmp_path / "missing.json")
    assert "--tokenizer" in error and "missing.json" in error
    assert not (tmp_path / "new").exists()


def test_unknown_weights_are_refused():
    model = ModelConfig(num_layers=0, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, swiglu=True,
                        untie_embeddings_and_output_weights=True)
    params = {"embedding.word_embeddings.weight": torch.zeros(12, 8), "output_layer.weight": torch.zeros(12, 8),
              "decoder.final_layernorm.weight": torch.ones(8)}
    assert to_hf_state_dict(params, model, 10)["lm_head.weight"].shape == (10, 8)
    with pytest.raises(ExportError, match="no place for.*q_layernorm"):
        to_hf_state_dict({**params, "decoder.layers.0.self_attention.q_layernorm.weight": torch.ones(4)}, model, 10)
    with pytest.raises(ExportError, match="output_layer.weight"):
        to_hf_state_dict({k: v for k, v in params.items() if k != "output_layer.weight"}, model, 10)


def test_null_tokenizer_runs_export_no_tokenizer_files(tmp_path):
    prepared = prepare_tokenizer(DataConfig(tokenizer_type="NullTokenizer", vocab_size=99), None, 100)
    assert prepared.tokenizer is None and prepared.eos_token_id is None and "--tokenizer" in prepared.note
    write_tokenizer_files(tmp_path, prepared, 128)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_whole_directory(tmp_path):
    from megatron_mile.atomic_io import replace_directory
    from megatron_mile.export.hf_directory import prepare_output

    output, new = tmp_path / "hf", tmp_path / ".hf.tmp-1"
    output.mkdir()
    (output / "stale.bin").write_text("old")
    new.mkdir()
    (new / "config.json").write_text("{}")
    prepare_output(output, overwrite=True)
    replace_directory(new, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in output.iterdir()) == ["config.json"]
