"""Transformer Engine, FP8, fused-kernel and sequence-parallel flags (megatron_mile.kernels).

On CPU: every flag whose requirement is missing stops at start-up with one message naming it and the fix,
checked against simulated machines (KernelSupport: no GPU, a bare H100, an A100 / H100 with Transformer
Engine and apex); where the requirements are met the flags reach megatron-core's TransformerConfig.
Tests marked `gpu` train with Transformer Engine and FP8 on a real GPU (skipped without CUDA).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mile import kernels
from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from megatron_mile.kernels import KernelSupport
from tiny_model import LOSS_FLAGS, TINY_LLAMA, build_tiny_model

REPO = Path(__file__).resolve().parents[1]

NO_GPU = KernelSupport()
BARE_H100 = KernelSupport(compute_capability=(9, 0))  # a GPU without Transformer Engine or apex
A100 = KernelSupport.full(compute_capability=(8, 0))
H100 = KernelSupport.full(compute_capability=(9, 0))

TE = ["--transformer-impl", "transformer_engine"]
LOCAL = ["--transformer-impl", "local"]  # where a GPU machine with Transformer Engine would default to TE
FP8 = ["--fp8-format", "hybrid"]
FP8_READY = FP8 + TE + ["--bf16"]


def problems(extra, gpu, support, world_size=1):
    """The problem lines of the ConfigError the flags raise ([] when they validate)."""
    try:
        parse_args(TINY_LLAMA + extra, world_size=world_size, gpu_available=gpu, kernel_support=support)
    except ConfigError as error:
        return str(error).splitlines()[1:]
    return []


@pytest.mark.parametrize(
    "extra, gpu, support, world_size, expected",
    [
        # Transformer Engine layers
        (TE, False, NO_GPU, 1, ["--transformer-impl transformer_engine needs a CUDA GPU and Transformer Engine: "
                                "run on a GPU machine; install Transformer Engine"]),
        (TE, True, BARE_H100, 1, ["--transformer-impl transformer_engine needs Transformer Engine: install "
                                  "Transformer Engine (pip install .[gpu]"]),
        # FP8: each missing piece is named in the one message of --fp8-format
        (FP8 + TE, True, H100, 1, ["--fp8-format hybrid needs --bf16: add --bf16"]),
        (FP8 + ["--bf16"] + LOCAL, True, H100, 1, ["--fp8-format hybrid needs --transformer-impl transformer_engine: add "
                                           "--transformer-impl transformer_engine (megatron-core's local layers "
                                           "have no FP8)"]),
        (FP8, False, NO_GPU, 1, ["--fp8-format hybrid needs --bf16 and --transformer-impl transformer_engine and a "
                                 "GPU with FP8"]),
        (FP8_READY, False, NO_GPU, 1, ["--transformer-impl transformer_engine needs a CUDA GPU",
                                       "--fp8-format hybrid needs a GPU with FP8 (compute capability 8.9+"]),
        (FP8_READY, True, A100, 1, ["--fp8-format hybrid needs a GPU with FP8 (compute capability 8.9+: H100, "
                                    "L40S, ...), this one is 8.0"]),
        (FP8_READY + ["--fp8-recipe", "mxfp8"], True, H100, 1, ["needs a Blackwell GPU for --fp8-recipe mxfp8"]),
        (["--fp8-amax-history-len", "16"], True, H100, 1, ["--fp8-amax-history-len applies to FP8 training only: add "
                                                           "--fp8-format hybrid"]),
        (FP8_READY + ["--fp8-recipe", "tensorwise", "--fp8-amax-history-len", "16", "--fp8-margin", "1"], True, H100,
         1, ["--fp8-margin, --fp8-amax-history-len apply to --fp8-recipe delayed only (this run uses tensorwise)"]),
        (FP8_READY + ["--fp8-amax-history-len", "0"], True, H100, 1, ["--fp8-amax-history-len must be >= 1"]),
        (FP8_READY + ["--hidden-size", "72"], True, H100, 1, ["--fp8-format hybrid: Transformer Engine's FP8 GEMMs need "
                                                              "multiples of 16 in the feature dimensions and of 8 in "
                                                              "the tokens; got --hidden-size = 72"]),
        # Sequence parallelism
        (["--sequence-parallel", "--tensor-model-parallel-size", "2"], False, NO_GPU, 2,
         ["--sequence-parallel needs CUDA GPUs"]),
        (["--sequence-parallel", "--tensor-model-parallel-size", "2"] + LOCAL, True, H100, 2,
         ["--sequence-parallel needs --transformer-impl transformer_engine: megatron-core's local RMSNorm"]),
        (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--normalization", "LayerNorm"], True,
         BARE_H100, 2, ["--sequence-parallel needs apex's fused LayerNorm (or --transformer-impl transformer_engine)"]),
        # Fusions asked for explicitly
        (["--gradient-accumulation-fusion"], False, NO_GPU, 1,
         ["--gradient-accumulation-fusion needs a CUDA GPU and apex's fused_weight_gradient_mlp_cuda extension: run "
          "on a GPU machine; build NVIDIA apex"]),
        (["--masked-softmax-fusion"], True, BARE_H100, 1, ["--masked-softmax-fusion needs apex's "
                                                           "scaled_masked_softmax_cuda extensions"]),
        (["--rope-fusion"], True, BARE_H100, 1, ["--rope-fusion needs Transformer Engine: install Transformer Engine"]),
        (["--bias-dropout-fusion"], False, NO_GPU, 1, ["--bias-dropout-fusion needs a CUDA GPU"]),
        (["--bias-gelu-fusion"], True, H100, 1, ["--bias-gelu-fusion does not apply to this model: the MLP is "
                                                 "SwiGLU (--swiglu): use --bias-swiglu-fusion"]),
        # Communication features built on Transformer Engine
        (["--tp-comm-overlap"], False, NO_GPU, 1, ["--tp-comm-overlap needs CUDA GPUs and --transformer-impl "
                                                   "transformer_engine and --sequence-parallel: run on GPUs or drop "
                                                   "--tp-comm-overlap (unsupported on CPU)"]),
        (TE + ["--tp-comm-overlap", "--tensor-model-parallel-size", "2"], True, H100, 2,
         ["--tp-comm-overlap needs --sequence-parallel: add --sequence-parallel"]),
        (["--fp8-param-gather"], False, NO_GPU, 1, ["--fp8-param-gather needs CUDA GPUs and --transformer-impl "
                                                    "transformer_engine and --fp8-format and "
                                                    "--use-distributed-optimizer"]),
        (FP8_READY + ["--fp8-param-gather"], True, H100, 1, ["--fp8-param-gather needs --use-distributed-optimizer"]),
        (["--context-parallel-size", "2"], False, NO_GPU, 2, ["--context-parallel-size 2 needs CUDA GPUs and "
                                                              "--transformer-impl transformer_engine: run on GPUs or "
                                                              "drop --context-parallel-size 2 (unsupported on CPU)"]),
        (TE + ["--context-parallel-size", "2", "--seq-length", "30", "--max-position-embeddings", "32"], True,
         BARE_H100, 2, ["--transformer-impl transformer_engine needs Transformer Engine",
                        "--context-parallel-size 2 needs Transformer Engine and --seq-length divisible by 2 * CP = 4"]),
        (["--context-parallel-size", "2"], False, NO_GPU, 3, ["world size 3 is not divisible by TP * PP * CP = 1 * 1 * 2",
                                                              "--context-parallel-size 2 needs CUDA GPUs"]),
    ],
)
def test_each_missing_requirement_is_one_message_with_the_fix(extra, gpu, support, world_size, expected):
    lines = problems(extra, gpu, support, world_size)
    assert len(lines) == len(expected), lines
    for line, text in zip(lines, expected):
        assert text in line, (line, text)


@pytest.mark.parametrize(
    "extra, support, world_size",
    [
        (FP8_READY + ["--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max"], H100, 1),
        (FP8_READY + ["--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"], H100, 1),
        (FP8_READY + ["--fp8-recipe", "mxfp8"], KernelSupport.full(compute_capability=(10, 0)), 1),
        (TE + ["--bf16", "--sequence-parallel", "--tensor-model-parallel-size", "2", "--fused-lm-head"], H100, 2),
        (["--gradient-accumulation-fusion", "--masked-softmax-fusion", "--bias-dropout-fusion",
          "--bias-swiglu-fusion", "--rope-fusion"], H100, 1),
        (TE, KernelSupport(transformer_engine=True), 1),  # capability unknown: not held against FP8-free runs
        (TE + ["--bf16", "--sequence-parallel", "--tensor-model-parallel-size", "2", "--tp-comm-overlap"], H100, 2),
        (FP8_READY + ["--use-distributed-optimizer", "--fp8-param-gather"], H100, 2),
        (TE + ["--context-parallel-size", "2"], H100, 4),
    ],
)
def test_what_the_machine_supports_validates(extra, support, world_size):
    assert problems(extra, True, support, world_size) == []


def test_fusion_switches_off_and_local_layers_validate_on_cpu():
    off = ["--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
           "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion", "--no-rope-fusion", "--transformer-impl", "local"]
    assert problems(off + ["--fused-lm-head"], False, NO_GPU) == []
    config = parse_args(TINY_LLAMA + off, world_size=1, gpu_available=False, kernel_support=NO_GPU)
    assert config.kernels.gradient_accumulation_fusion is False and config.kernels.rope_fusion is False


def _fusions(extra, gpu, support):
    config = parse_args(TINY_LLAMA + extra, world_size=1, gpu_available=gpu, kernel_support=support)
    return kernels.resolve_fusions(config, gpu, support)


def test_fusions_default_to_on_where_their_kernel_exists():
    everything = dict(gradient_accumulation_fusion=True, masked_softmax_fusion=True, bias_dropout_fusion=True,
                      bias_activation_fusion=True, apply_rope_fusion=True)
    assert _fusions([], True, H100) == everything
    assert _fusions([], False, NO_GPU) == {name: False for name in everything}
    # A GPU without apex / Transformer Engine keeps only megatron's own jit fusions.
    assert _fusions([], True, BARE_H100) == dict(everything, gradient_accumulation_fusion=False,
                                                 masked_softmax_fusion=False, apply_rope_fusion=False)
    # --no-X turns one off; a fusion that does not fit the model stays off (GeLU without biases, no rope).
    assert _fusions(["--no-bias-swiglu-fusion", "--no-gradient-accumulation-fusion"], True, H100) == dict(
        everything, bias_activation_fusion=False, gradient_accumulation_fusion=False)
    gelu = [a for a in TINY_LLAMA if a not in ("--swiglu",)]
    config = parse_args(gelu + ["--position-embedding-type", "learned_absolute"], world_size=1, gpu_available=True,
                        kernel_support=H100)
    assert kernels.resolve_fusions(config, True, H100) == dict(everything, bias_activation_fusion=False,
                                                               apply_rope_fusion=False)
    with_bias = [a for a in gelu if a != "--disable-bias-linear"]
    config = parse_args(with_bias, world_size=1, gpu_available=True, kernel_support=H100)
    assert kernels.resolve_fusions(config, True, H100)["bias_activation_fusion"] is True


def test_availability_is_detected_without_importing(tmp_path, monkeypatch):
    # A module that would crash on import: find_spec must see it without running it.
    (tmp_path / "crashes_on_import.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert kernels.module_available("crashes_on_import")
    assert "crashes_on_import" not in sys.modules
    assert not kernels.module_available("no_such_module_here")
    assert kernels.detect_kernel_support(False) == NO_GPU  # nothing counts without a GPU
    if not torch.cuda.is_available():
        # Told "GPU" on a machine without one (a script checked elsewhere): no crash, capability unknown.
        support = kernels.detect_kernel_support(True)
        assert support.compute_capability is None and support.transformer_engine == kernels.module_available(
            "transformer_engine")


def test_fp8_flags_reach_megatron_transformer_config():
    from megatron_mile.model import transformer_config

    argv = TINY_LLAMA + FP8_READY + ["--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
                                     "--fp8-margin", "2"]
    config = parse_args(argv, world_size=1, gpu_available=True, kernel_support=H100)
    tf = transformer_config(config)
    assert (tf.fp8, tf.fp8_recipe, tf.fp8_margin, tf.fp8_amax_history_len, tf.fp8_amax_compute_algo) == (
        "hybrid", "delayed", 2, 1024, "max")
    assert tf.bf16 and tf.params_dtype == torch.bfloat16
    if not torch.cuda.is_available():  # this process resolves fusions for its own machine: none on CPU
        assert not (tf.gradient_accumulation_fusion or tf.masked_softmax_fusion or tf.bias_dropout_fusion
                    or tf.bias_activation_fusion or tf.apply_rope_fusion)
    plain = transformer_config(parse_args(TINY_LLAMA, world_size=1, gpu_available=False, kernel_support=NO_GPU))
    assert plain.fp8 is None and plain.fp8_recipe == "delayed" and plain.fp8_amax_history_len == 1


def test_communication_features_reach_megatron_core():
    from megatron_mile.model import transformer_config
    from megatron_mile.training.optimizer import ddp_config

    argv = TINY_LLAMA + FP8_READY + ["--sequence-parallel", "--tensor-model-parallel-size", "2", "--tp-comm-overlap",
                                     "--use-distributed-optimizer", "--fp8-param-gather", "--context-parallel-size", "2"]
    config = parse_args(argv, world_size=8, gpu_available=True, kernel_support=H100)
    tf = transformer_config(config)
    assert (tf.tp_comm_overlap, tf.fp8_param, tf.context_parallel_size) == (True, True, 2)
    assert ddp_config(config).fp8_param_gather is True
    # Data parallel = world / (TP * PP * CP): 8 / (2 * 1 * 2); the global batch defaults to micro-batch * DP.
    assert config.data_parallel_size(8) == 2
    plain = transformer_config(parse_args(TINY_LLAMA, world_size=1, gpu_available=False, kernel_support=NO_GPU))
    assert (plain.tp_comm_overlap, plain.fp8_param, plain.context_parallel_size) == (False, False, 1)


def test_layer_spec_follows_transformer_impl(monkeypatch):
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_mile.model import gpt as model

    sentinel = ModuleSpec(module=TransformerLayer)
    monkeypatch.setattr(model, "get_gpt_layer_with_transformer_engine_spec", lambda: sentinel)
    te = parse_args(TINY_LLAMA + TE, world_size=1, gpu_available=True, kernel_support=H100)
    assert model.transformer_layer_spec(te) is sentinel
    local = parse_args(TINY_LLAMA, world_size=1, gpu_available=False, kernel_support=NO_GPU)
    spec = model.transformer_layer_spec(local)
    assert spec is not sentinel and spec.submodules.input_layernorm is WrappedTorchNorm


def test_entry_script_exits_2_naming_transformer_engine_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU message")
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt_mile.py"), *TINY_LLAMA, *FP8_READY],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--transformer-impl transformer_engine needs a CUDA GPU and Transformer Engine" in proc.stderr
    assert "--fp8-format hybrid needs a GPU with FP8" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------- on a GPU (H100 + TE)


def _require_te(min_capability=(8, 0)):
    pytest.importorskip("transformer_engine")
    if torch.cuda.get_device_capability() < min_capability:
        pytest.skip(f"needs compute capability {min_capability}")


_LOG_LINE = re.compile(r"iteration\s+(\d+)/.*?training loss \(\w+\): (\S+) \|.*?grad norm: (\S+) \|")


def torchrun_history(argv, nproc=1, timeout=600):
    """Train through pretrain_gpt_mile.py under torchrun (NCCL, as in production) with --log-interval 1;
    return [(training loss, grad norm)] per iteration, parsed from the log."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(REPO / "pretrain_gpt_mile.py"), *argv, "--log-interval", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    history = [(float(loss), float(norm)) for _, loss, norm in _LOG_LINE.findall(proc.stdout)]
    assert history, proc.stdout[-4000:]
    return history


def build_and_step_te_model(argv):
    """Worker body: build the model with Transformer Engine layers, run one forward/backward, report."""
    from megatron_mile.training.initialize import initialize_parallel

    config = parse_args(argv, world_size=1, gpu_available=True)
    initialize_parallel(config)
    (chunk,) = build_tiny_model(config, 300)
    layer = chunk.decoder.layers[0]
    tokens = torch.randint(0, 300, (2, config.model.seq_length), device="cuda")
    positions = torch.arange(config.model.seq_length, device="cuda").expand(2, -1)
    seen = {}
    chunk.output_layer.register_forward_hook(lambda m, i, o: seen.update(logits=o[0].dtype))
    # --bf16 builds the weights in bf16 (training wraps them in Float16Module for the fp32 main copy).
    packed = chunk(tokens, positions, None, labels=tokens, loss_mask=torch.ones_like(tokens, dtype=torch.float))
    packed[..., 0].sum().backward()
    return {
        "qkv": type(layer.self_attention.linear_qkv).__module__ + "." + type(layer.self_attention.linear_qkv).__name__,
        "output_layer": type(chunk.output_layer).__name__,
        "logits": str(seen.get("logits")),
        "packed": str(packed.dtype),
        "finite": bool(torch.isfinite(packed).all()) and all(
            p.grad is None or bool(torch.isfinite(p.grad).all()) for p in chunk.parameters()),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_te_spec_builds_te_layers_and_keeps_the_output_layer_bf16(dist_pool, fp8):
    _require_te((8, 9) if fp8 else (8, 0))
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + TE + ["--bf16"] + (FP8 if fp8 else [])
    report = dist_pool(1).run(build_and_step_te_model, argv)[0]
    assert report["qkv"].startswith("megatron.core.extensions.transformer_engine"), report
    assert report["output_layer"] == "ColumnParallelLinear", report  # megatron's own: not FP8
    assert report["logits"] == "torch.bfloat16" and report["packed"] == "torch.float32", report
    assert report["finite"], report


@pytest.mark.gpu
def test_fp8_training_is_finite_and_close_to_bf16():
    _require_te((8, 9))
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + TE + ["--bf16", "--train-iters", "5"]
    bf16 = torchrun_history(argv)
    fp8 = torchrun_history(argv + FP8 + ["--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "max"])
    assert len(bf16) == len(fp8) == 5
    for step, ((loss_8, norm_8), (loss_16, _)) in enumerate(zip(fp8, bf16), start=1):
        assert torch.isfinite(torch.tensor([loss_8, norm_8])).all(), (step, fp8)
        # FP8 GEMMs in 4 small layers move the loss by well under 5% from the bf16 run.
        assert abs(loss_8 - loss_16) <= 0.05 * abs(loss_16), (step, fp8, bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_fused_lm_head_matches_unfused_in_bf16_on_gpu(impl):
    if impl == "transformer_engine":
        _require_te()
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + ["--bf16", "--transformer-impl", impl]
    unfused = torchrun_history(argv)
    fused = torchrun_history(argv + ["--fused-lm-head"])
    for (loss_f, norm_f), (loss_u, norm_u) in zip(fused, unfused):
        assert abs(loss_f - loss_u) <= 1e-2 * abs(loss_u) and abs(norm_f - norm_u) <= 5e-2 * abs(norm_u)


@pytest.mark.gpu
def test_sequence_parallel_with_fused_lm_head_matches_tp2_without():
    _require_te()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + TE + ["--bf16", "--tensor-model-parallel-size", "2"]
    reference = torchrun_history(argv, nproc=2)
    for extra in (["--sequence-parallel"], ["--sequence-parallel", "--fused-lm-head"]):
        for (loss, norm), (loss_r, norm_r) in zip(torchrun_history(argv + extra, nproc=2), reference):
            assert abs(loss - loss_r) <= 1e-2 * abs(loss_r) and abs(norm - norm_r) <= 5e-2 * abs(norm_r), extra


def test_sequence_parallel_at_tp1_is_turned_off_with_a_note():
    """Megatron-LM turns --sequence-parallel off (with a warning) when TP is 1; so does the parser here."""
    config = parse_args(TINY_LLAMA + ["--sequence-parallel"], world_size=1)
    assert config.parallel.sequence_parallel is False
    assert any("--sequence-parallel turned off" in note for note in config.notes)
    at_tp2 = parse_args(TINY_LLAMA + TE + ["--sequence-parallel", "--tensor-model-parallel-size", "2"], world_size=2,
                        gpu_available=True, kernel_support=H100)
    assert at_tp2.parallel.sequence_parallel is True and not any("sequence" in n for n in at_tp2.notes)



@pytest.mark.parametrize("gpu, support, impl, why", [
    (True, H100, "transformer_engine", "Transformer Engine is installed and a GPU is visible"),
    (True, BARE_H100, "local", "Transformer Engine is not installed"),
    (False, NO_GPU, "local", "no GPU is visible"),
])
def test_the_default_transformer_impl_is_transformer_engine_where_it_can_run(gpu, support, impl, why):
    config = parse_args(TINY_LLAMA, gpu_available=gpu, kernel_support=support)
    assert config.kernels.transformer_impl == impl
    assert [note for note in config.notes if note.startswith("--transformer-impl")] == [
        f"--transformer-impl {impl} (the default here: {why}" + (
            "; Megatron-LM's default transformer_engine needs both)" if impl == "local" else ")")]
    explicit = parse_args(TINY_LLAMA + LOCAL, gpu_available=gpu, kernel_support=support)
    assert explicit.kernels.transformer_impl == "local" and explicit.notes == []  # a given flag is not noted
