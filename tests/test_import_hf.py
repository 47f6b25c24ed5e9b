"""Import from Hugging Face: tiny random LlamaForCausalLM models built and saved by transformers itself (GQA, a
vocabulary of 250 tokens that pads to 256 rows at TP 2, non-default rope base and norm epsilon, distinct norm
weights; untied embeddings, and tied ones with a head dimension other than hidden / heads) are imported by
tools/import_hf.py at TP 2 x PP 2, then:

- our model, built from the printed flags and loaded from the checkpoint at TP 2 x PP 2, gives transformers'
  logits within 1e-4 (fp32) on the same tokens;
- the project's export of the import gives back every tensor of the original, bit-exact;
- training from the import (the printed flags, --pretrained-checkpoint, --loss-type mile) has a first-step loss
  equal to the MiLe loss and cross-entropy of transformers' logits on the same batch (the plain reference of
  megatron_mile.loss.reference on the independent side);
- each unsupported or unsafe input exits 1 with its one-line reason and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_mile.hf_import.cli import import_main

# Nothing may be downloaded: huggingface_hub reads these when it is imported (by transformers below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 250  # pads to 256 rows at TP 2 with --make-vocab-size-divisible-by 128
EOD = VOCAB - 1
SEQ = 16
BATCH = 2
TP, PP = 2, 2


# LLaMA 3.1's RoPE scaling with megatron-core's fixed constants, and linear position interpolation.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}


def make_hf_model(directory: Path, tied: bool, head_dim=None, qwen2: bool = False, shards: bool = False,
                  rope_scaling=None, rope_theta=1000.0) -> Path:
    """A 4-layer Llama (or Qwen2: Llama with query/key/value biases) saved by transformers (safetensors; with
    `shards` in several files and model.safetensors.index.json, as large models are) with a 250-token
    tokenizer.json beside it; `rope_scaling` a scaled RoPE (transformers' rope_scaling argument)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3 + tied + 2 * qwen2)
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if qwen2 else (LlamaConfig, LlamaForCausalLM)
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim or 16,
                          max_position_embeddings=64, rope_theta=rope_theta, rms_norm_eps=1e-6,
                          tie_word_embeddings=tied, initializer_range=0.2, rope_scaling=rope_scaling)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # fresh norms are all ones, which would hide a swapped or missing norm
                param.copy_(1.0 + 0.5 * torch.randn(param.shape))
            if name.endswith("bias"):  # fresh biases are zeros, which would hide a misplaced one
                param.copy_(0.5 * torch.randn(param.shape))
    model.save_pretrained(directory, max_shard_size="100KB" if shards else "1GB")
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": EOD}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def tokens():
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def run_flags(training_flags, *extra):
    """The printed training flags with a short sequence and a one-step MiLe run on mock data."""
    return list(training_flags) + ["--seq-length", str(SEQ), "--mock-data", "--micro-batch-size", str(BATCH),
                                   "--global-batch-size", str(2 * BATCH), "--train-iters", "1", "--lr", "1e-3",
                                   "--eval-iters", "0", "--no-progress", "--loss-type", "mile", *extra]


def pool_runner(dist_pool):
    """import_checkpoint's runner on the session's pool (no new processes to spawn)."""
    def run(fn, world_size, *args, **kwargs):
        return dist_pool(world_size).run(fn, *args, **kwargs)
    return run


@pytest.fixture(scope="module", params=["untied", "tied", "qwen2", "llama3_rope", "linear_rope"])
def imported(request, dist_pool, tmp_path_factory):
    """(HF directory, save directory, training flags, kind) of a model imported at TP 2 x PP 2: untied (in several
    files); tied with a head dimension of 32 (not hidden / heads = 16); Qwen2 (untied, query/key/value biases);
    untied with LLaMA 3.1's RoPE scaling (rope base 500000, so that its long wavelengths are rescaled) and with
    linear position interpolation."""
    from megatron_mile.hf_import.checkpoint import import_checkpoint

    tied = request.param == "tied"
    root = tmp_path_factory.mktemp(f"import_{request.param}")
    rope = {"llama3_rope": LLAMA3_ROPE, "linear_rope": LINEAR_ROPE}.get(request.param)
    hf_dir = make_hf_model(root / "hf", tied, head_dim=32 if tied else None, qwen2=request.param == "qwen2",
                           shards=request.param == "untied", rope_scaling=rope,
                           rope_theta=500000.0 if request.param == "llama3_rope" else 1000.0)
    lines = []
    result = import_checkpoint(hf_dir, root / "save", TP, PP, runner=pool_runner(dist_pool), log=lines.append)
    assert "256 rows" in "\n".join(lines)
    return hf_dir, result.save_dir, result.training_flags, request.param


def worker_logits(flags, save_dir, input_ids):
    """Our model built from `flags` at this worker's layout, loaded from `save_dir`; its logits (last stage)."""
    from megatron_mile import checkpointing
    from megatron_mile.arguments import config_to_dict
    from tiny_model import build_tiny_model, layout_logits, tiny_config

    config = tiny_config(flags)
    chunks = build_tiny_model(config, VOCAB)
    checkpointing.load_model_weights(save_dir, chunks, config_dict=config_to_dict(config))
    return layout_logits(chunks, input_ids)


def test_our_logits_equal_transformers(imported, dist_pool):
    hf_dir, save_dir, flags, kind = imported
    assert ("--untie-embeddings-and-output-weights" in flags) == (kind != "tied")
    assert ("--kv-channels" in flags) == (kind == "tied")  # head_dim 32 with hidden 64 over 4 heads
    assert ("--add-qkv-bias" in flags) == (kind == "qwen2")
    assert ("--use-rope-scaling --rope-scaling-factor 8.0" in " ".join(flags)) == (kind == "llama3_rope")
    assert ("--rotary-seq-len-interpolation-factor 2.0" in " ".join(flags)) == (kind == "linear_rope")
    base = "500000" if kind == "llama3_rope" else "1000"
    for expected in (["--group-query-attention", "--num-query-groups", "2"], ["--rotary-base", base],
                     ["--norm-epsilon", "1e-06"], ["--tokenizer-model", str(save_dir / "tokenizer.json")]):
        assert " ".join(expected) in " ".join(flags), expected
    per_rank = dist_pool(TP * PP).run(worker_logits, run_flags(flags), str(save_dir), tokens(),
                                      tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    ours = next(r for r in per_rank if r is not None)
    assert ours.shape == (BATCH, SEQ, 256)
    with torch.no_grad():
        theirs = hf_model(hf_dir)(tokens()).logits
    assert theirs.abs().max() > 0.5  # not a degenerate model whose logits agree trivially
    torch.testing.assert_close(ours[..., :VOCAB], theirs, atol=1e-4, rtol=0)


def worker_export(save_dir, output):
    from megatron_mile.export.hf_directory import export_checkpoint

    export_checkpoint(save_dir, output, log=lambda _: None)


def test_export_of_the_import_gives_back_every_tensor(imported, dist_pool, tmp_path):
    from safetensors.torch import load_file

    hf_dir, save_dir, _, kind = imported
    output = tmp_path / "exported"
    dist_pool(1).run(worker_export, str(save_dir), str(output))
    original = {name: tensor for path in sorted(hf_dir.glob("*.safetensors")) for name, tensor in load_file(path).items()}
    exported = load_file(output / "model.safetensors")
    if kind == "untied":  # read through model.safetensors.index.json
        assert (hf_dir / "model.safetensors.index.json").is_file() and len(list(hf_dir.glob("*.safetensors"))) > 2
    if kind == "tied":  # the export writes the shared matrix as lm_head too
        assert "lm_head.weight" not in original
        original["lm_head.weight"] = original["model.embed_tokens.weight"]
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor), name
    theirs, ours = json.loads((hf_dir / "config.json").read_text()), json.loads((output / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings"):
        assert ours[key] == theirs[key], key
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"] == (500000 if kind == "llama3_rope" else 1000)
    assert ours["rope_parameters"] == theirs["rope_parameters"]  # the scaled RoPE's type and constants too


def worker_first_step(flags):
    """(training loss, lm loss) of the first step of a run on `flags`, and the global batch it trained on."""
    from megatron_mile.arguments import parse_args
    from megatron_mile.training import data as run_data
    from megatron_mile.training.loop import pretrain

    seen = {}

    def datasets(config, tokenizer, eval_samples):
        train, valid = run_data.build_datasets(config, tokenizer, eval_samples)
        # The sampler takes samples 0 .. G-1 for the first global batch (megatron's pretraining order).
        seen["batch"] = [train[i] for i in range(config.training.global_batch_size)]
        return train, valid

    result = pretrain(parse_args(flags, world_size=TP * PP), dataset_provider=datasets)
    first = result.history[0]
    return first.loss, first.lm_loss, seen["batch"]


def test_training_continues_from_the_import_with_mile(imported, dist_pool, tmp_path):
    """The printed flags (--pretrained-checkpoint, a new --load/--save) and, untied, --load <import> --finetune."""
    from megatron_mile.loss.reference import reference_global_loss, reference_token_losses

    hf_dir, save_dir, flags, kind = imported
    run = str(tmp_path / "run")
    starts = {"printed": run_flags(flags, "--load", run, "--save", run)}
    if kind == "untied":
        without = flags[:flags.index("--pretrained-checkpoint")] + flags[flags.index("--pretrained-checkpoint") + 2:]
        starts["finetune"] = run_flags(without, "--load", str(save_dir), "--finetune")
    for how, run_args in starts.items():
        per_rank = dist_pool(TP * PP).run(worker_first_step, run_args, tensor_model_parallel_size=TP,
                                          pipeline_model_parallel_size=PP)
        loss, lm_loss, batch = per_rank[-1]  # the last pipeline stage reports the losses
        input_ids = torch.stack([torch.as_tensor(s["tokens"]) for s in batch])
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in batch])
        loss_mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in batch])
        assert input_ids.shape == (2 * BATCH, SEQ) and int(input_ids.max()) <= EOD
        with torch.no_grad():
            logits = hf_model(hf_dir)(input_ids).logits  # [G, s, V]
        mile = reference_token_losses(logits, labels, "mile", gamma=1.0, sigma=1.0, ignore_index=None)
        ce = reference_token_losses(logits, labels, "cross_entropy", ignore_index=None)
        expected_loss = reference_global_loss(mile["ce"], mile["weight"], loss_mask)
        expected_lm_loss = reference_global_loss(ce["ce"], ce["weight"], loss_mask)
        assert float(expected_loss) != pytest.approx(float(expected_lm_loss), abs=1e-4)  # the weights matter
        assert loss == pytest.approx(float(expected_loss), abs=2e-5), how
        assert lm_loss == pytest.approx(float(expected_lm_loss), abs=2e-5), how


# ----------------------------------------------------------------------------------------------------------
# Refusals: exit code 1, one line naming the field and why, nothing written (no process is started)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("refusals") / "hf", tied=False)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


class _RunsCodeWhenUnpickled:
    """A pickle whose loading creates a file: reading a pytorch_model.bin with plain pickle would run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_kv_head(directory: Path) -> None:
    """Weights and config of a Llama with a single key/value head (TP 2 cannot split it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(directory)


def _pickle_only(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    torch.save({"payload": _RunsCodeWhenUnpickled(directory.parent / "ran")}, directory / "pytorch_model.bin")


REFUSALS = {
    "rope_llama3_constants": (lambda d: _edit_config(d, rope_parameters={**LLAMA3_ROPE, "rope_theta": 1000.0,
                                                                          "high_freq_factor": 2.0}),
                              ["rope_parameters high_freq_factor is 2.0", "fixed at 4"]),
    "rope_scaling_v4": (lambda d: _edit_config(d, rope_scaling={"type": "dynamic", "factor": 2.0}),
                        ["rope_scaling", "'dynamic'", "default, llama3 and linear"]),
    "rope_disagreement": (lambda d: _edit_config(d, rope_scaling=LINEAR_ROPE,
                                                 rope_parameters={**LLAMA3_ROPE, "rope_theta": 1000.0}),
                          ["describe different RoPE scalings"]),
    "attention_bias": (lambda d: _edit_config(d, attention_bias=True), ["attention_bias is true", "biases"]),
    "mlp_bias": (lambda d: _edit_config(d, mlp_bias=True), ["mlp_bias is true"]),
    "hidden_act": (lambda d: _edit_config(d, hidden_act="gelu"), ["hidden_act is 'gelu'", "silu"]),
    "sliding_window": (lambda d: _edit_config(d, model_type="mistral", architectures=["MistralForCausalLM"],
                                              sliding_window=16), ["sliding_window is 16", "full causal"]),
    "model_type": (lambda d: _edit_config(d, model_type="gemma", architectures=["GemmaForCausalLM"]),
                   ["model_type is 'gemma'"]),
    "qwen2_sliding": (lambda d: _edit_config(d, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                                             use_sliding_window=True, sliding_window=32), ["sliding_window is 32"]),
    "missing_config": (lambda d: (d / "config.json").unlink(), ["config.json is missing"]),
    "pickle_only": (_pickle_only, ["pytorch_model.bin", "pickle", "safetensors"]),
    "no_tokenizer": (lambda d: (d / "tokenizer.json").unlink(), ["no tokenizer.json"]),
    "shape": (lambda d: _edit_config(d, intermediate_size=128),
              ["mlp.gate_proj.weight has shape (96, 64)", "(128, 64)"]),
    "tp_divides_heads": (_one_kv_head, ["--tensor-model-parallel-size 2 does not divide --num-query-groups 1"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_write_nothing(case, hf_source, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_source, hf_dir)
    change, expected = REFUSALS[case]
    change(hf_dir)
    capsys.readouterr()  # what transformers printed while saving
    save = tmp_path / "save"
    code = import_main(["--hf", str(hf_dir), "--save", str(save), "--tensor-model-parallel-size", "2",
                        "--pipeline-model-parallel-size", "2"])
    error = capsys.readouterr().err
    assert code == 1, error
    assert error.startswith("import_hf.py: error: ") and error.count("\n") == 1, error
    for text in expected:
        assert text in error, (text, error)
    assert not save.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp directory left either
    assert not (tmp_path / "ran").exists()


def test_a_non_empty_save_directory_is_refused(hf_source, tmp_path, capsys):
    save = tmp_path / "save"
    save.mkdir()
    (save / "keep.txt").write_text("earlier work")
    assert import_main(["--hf", str(hf_source), "--save", str(save)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in save.iterdir()) == ["keep.txt"]


def test_the_command_line_prints_a_training_command_that_matches_the_checkpoint(hf_source, dist_pool, tmp_path,
                                                                               capsys):
    """tools/import_hf.py's main at TP 1: the printed command parses, and its model flags are the saved run's."""
    import shlex

    from megatron_mile import checkpointing
    from megatron_mile.arguments import config_to_dict, parse_args

    save = tmp_path / "save"
    capsys.readouterr()
    assert import_main(["--hf", str(hf_source), "--save", str(save)], runner=pool_runner(dist_pool)) == 0
    printed = capsys.readouterr().out
    command = shlex.split(printed[printed.index("torchrun"):].replace("\\\n", " ").split("<")[0])
    assert command[:4] == ["torchrun", "--nproc_per_node", "1", "pretrain_gpt_mile.py"]
    assert command[-4:] == ["--load", "RUN_DIR", "--save", "RUN_DIR"]
    config = parse_args(command[4:-4] + ["--mock-data", "--train-iters", "1", "--micro-batch-size", "1"])  # the run's own
    assert config.training.pretrained_checkpoint == str(save)
    assert config.data.tokenizer_model == str(save / "tokenizer.json")

    assert sorted(p.name for p in save.iterdir()) == ["iter_0000000", "latest_checkpointed_iteration.txt",
                                                       "tokenizer.json", "tokenizer_config.json"]
    metadata = checkpointing.read_checkpoint_metadata(save)
    assert metadata["iteration"] == 0 and metadata["vocab"] == {"real": VOCAB, "padded": 256}
    assert not metadata["has_optimizer"] and not metadata["has_rng"]
    saved_model, printed_model = metadata["config"]["model"], config_to_dict(config)["model"]
    for name in checkpointing.ARCHITECTURE_FIELDS + ("kv_channels", "add_qkv_bias", "max_position_embeddings"):
        assert saved_model[name] == printed_model[name], name


def test_bf16_weights_import_exactly(hf_source, dist_pool, tmp_path):
    """A model saved in bf16 (as most released ones are) is stored in fp32 without rounding: its export gives
    back the bf16 values exactly."""
    from safetensors.torch import load_file, save_file

    from megatron_mile.hf_import.checkpoint import import_checkpoint

    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_source, hf_dir)
    original = load_file(hf_dir / "model.safetensors")
    bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in original.items()}
    save_file(bf16, hf_dir / "model.safetensors", metadata={"format": "pt"})
    import_checkpoint(hf_dir, tmp_path / "save", runner=pool_runner(dist_pool), log=lambda _: None)
    dist_pool(1).run(worker_export, str(tmp_path / "save"), str(tmp_path / "exported"))
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert sorted(exported) == sorted(bf16)
    for name, tensor in bf16.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor.float()), name
    assert not torch.equal(bf16["lm_head.weight"].float(), original["lm_head.weight"])  # bf16 did round
