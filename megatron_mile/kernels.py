"""Layer implementation and fused kernels: what this machine offers, what a run asks for, what megatron gets.

Three kinds of optional GPU code sit under megatron-core, each with its own requirement:

- Transformer Engine (`--transformer-impl transformer_engine`): TE's fused norm + linear layers and
  attention, needed for FP8 (`--fp8-format`) and for sequence parallelism with RMSNorm;
- apex's CUDA extensions (built from source, preinstalled in NVIDIA's PyTorch containers): the fused weight
  gradient accumulation of megatron's own linear layers (`fused_weight_gradient_mlp_cuda`), the fused
  masked softmax of its local attention (`scaled_masked_softmax_cuda`, ...), its fused LayerNorm
  (`fused_layer_norm_cuda`);
- torch-jit fusions megatron-core ships itself (bias + dropout + add, bias + SwiGLU / GeLU), CUDA only here
  (on CPU they would go through a multi-second torch.compile for nothing).

Three communication features build on Transformer Engine and are checked here too: --tp-comm-overlap
(userbuffers overlapping the sequence-parallel collectives with the GEMMs), --fp8-param-gather (fp8 weights,
all-gathered in fp8 by the distributed optimizer) and --context-parallel-size > 1 (ring attention); so is
--recompute-modules layernorm, whose megatron-core checkpoint queries Transformer Engine's FP8 state.

Availability is detected with importlib.util.find_spec on top-level module names, which never imports the
package: a broken or CPU-only install cannot crash start-up, and nothing is imported on a CPU machine.

The fusion flags follow Megatron-LM's spelling (`--no-gradient-accumulation-fusion`, `--no-rope-fusion`,
...) and its default (on), with one difference: "on" means "on where its kernel exists", so the same flags run
on a CPU, on a GPU without apex and in NVIDIA's container. The positive form (`--gradient-accumulation-fusion`)
insists: a run that asks for a fusion its machine cannot provide stops at start-up with one message that
names what is missing and the fix, like every other invalid flag (megatron_mile.config.RunConfig.validate).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # config imports this module; at run time the config object is passed in
    from megatron_mile.config import RunConfig

# Compute capability FP8 needs (Ada / Hopper), and MXFP8 (Blackwell).
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
MXFP8_MIN_COMPUTE_CAPABILITY = (10, 0)

INSTALL_TE = "install Transformer Engine (pip install .[gpu], or run in NVIDIA's PyTorch container)"
INSTALL_APEX = "build NVIDIA apex with its CUDA extensions (preinstalled in NVIDIA's PyTorch containers)"


def module_available(name: str) -> bool:
    """True when the top-level module `name` can be imported; never imports it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a half-installed package can make find_spec itself fail
        return False


@dataclass(frozen=True)
class KernelSupport:
    """Which optional kernel packages this machine has (see the module docstring for what each one is).

    compute_capability: (major, minor) of the visible GPU, None when there is none or it is not known
    (e.g. when a launch script is validated on another machine).
    """

    transformer_engine: bool = False
    apex_gradient_accumulation_fusion: bool = False
    apex_masked_softmax: bool = False
    apex_layer_norm: bool = False
    compute_capability: Optional[Tuple[int, int]] = None

    @classmethod
    def full(cls, compute_capability: Optional[Tuple[int, int]] = None) -> "KernelSupport":
        """A GPU machine with Transformer Engine and apex (NVIDIA's PyTorch container), e.g. to check a
        launch script for the cluster it is written for."""
        return cls(True, True, True, True, compute_capability)


@lru_cache(maxsize=None)
def detect_kernel_support(gpu_available: bool) -> KernelSupport:
    """What this process can use. Without a GPU nothing is usable, whatever is installed."""
    if not gpu_available:
        return KernelSupport()
    import torch

    try:
        capability = tuple(torch.cuda.get_device_capability())
    except (AssertionError, RuntimeError):  # told "GPU" by a caller on a machine without CUDA
        capability = None
    return KernelSupport(
        transformer_engine=module_available("transformer_engine"),
        apex_gradient_accumulation_fusion=module_available("fused_weight_gradient_mlp_cuda"),
        apex_masked_softmax=module_available("scaled_masked_softmax_cuda")
        and module_available("scaled_upper_triang_masked_softmax_cuda"),
        apex_layer_norm=module_available("apex") and module_available("fused_layer_norm_cuda"),
        compute_capability=capability,
    )


# ---------------------------------------------------------------------------------------------- fusions


@dataclass(frozen=True)
class Fusion:
    """One fused kernel switch: the KernelConfig field (flags --NAME / --no-NAME), the TransformerConfig
    field it sets, why it would not apply to this model, and what it needs from the machine."""

    name: str
    core_field: str
    not_applicable: Callable[["RunConfig"], Optional[str]]
    missing: Callable[[bool, KernelSupport], List[str]]


def _needs_gpu(gpu: bool, support: KernelSupport) -> List[str]:
    return [] if gpu else ["a CUDA GPU"]


def _needs_apex(attribute: str, what: str) -> Callable[[bool, KernelSupport], List[str]]:
    def missing(gpu: bool, support: KernelSupport) -> List[str]:
        if not gpu:
            return ["a CUDA GPU", f"apex's {what}"]
        return [] if getattr(support, attribute) else [f"apex's {what}"]

    return missing


def _needs_te(gpu: bool, support: KernelSupport) -> List[str]:
    if not gpu:
        return ["a CUDA GPU", "Transformer Engine"]
    return [] if support.transformer_engine else ["Transformer Engine"]


FUSIONS: Tuple[Fusion, ...] = (
    Fusion(
        "gradient_accumulation_fusion", "gradient_accumulation_fusion",
        lambda c: None,
        _needs_apex("apex_gradient_accumulation_fusion", "fused_weight_gradient_mlp_cuda extension"),
    ),
    Fusion(
        "masked_softmax_fusion", "masked_softmax_fusion",
        # Its causal kernel builds the triangle itself and ignores the data loader's mask.
        lambda c: "its causal kernel ignores the block-diagonal mask of --reset-attention-mask"
        if c.data.reset_attention_mask else None,
        _needs_apex("apex_masked_softmax", "scaled_masked_softmax_cuda extensions"),
    ),
    Fusion("bias_dropout_fusion", "bias_dropout_fusion", lambda c: None, _needs_gpu),
    Fusion(
        "bias_swiglu_fusion", "bias_activation_fusion",
        lambda c: None if c.model.swiglu else "it fuses the SwiGLU MLP: add --swiglu",
        _needs_gpu,
    ),
    Fusion(
        "bias_gelu_fusion", "bias_activation_fusion",
        lambda c: "the MLP is SwiGLU (--swiglu): use --bias-swiglu-fusion" if c.model.swiglu
        else ("megatron-core fuses GeLU with a bias only: drop --disable-bias-linear"
              if c.model.disable_bias_linear else None),
        _needs_gpu,
    ),
    Fusion(
        "rope_fusion", "apply_rope_fusion",
        lambda c: None if c.model.position_embedding_type == "rope" else "it fuses rotary embeddings: "
        "add --position-embedding-type rope",
        _needs_te,
    ),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_fusions(config: "RunConfig", gpu: bool, support: KernelSupport) -> Dict[str, bool]:
    """TransformerConfig fusion fields for this run: a flag left unset means on where it applies and its
    kernel exists; explicit values are taken as they are (validate has refused impossible ones)."""
    values: Dict[str, bool] = {}
    for fusion in FUSIONS:
        requested = getattr(config.kernels, fusion.name)
        applies = fusion.not_applicable(config) is None
        if requested is None:
            on = applies and not fusion.missing(gpu, support)
        else:
            on = bool(requested) and applies
        # Two switches (SwiGLU and GeLU) share bias_activation_fusion; only the applicable one counts.
        values[fusion.core_field] = values.get(fusion.core_field, False) or on
    return values


# ------------------------------------------------------------------------------------------- validation


def _verb(flags: List[str]) -> str:
    return "applies" if len(flags) == 1 else "apply"


def _needs_message(flag: str, missing: List[str], fixes: List[str]) -> str:
    return f"{flag} needs {' and '.join(missing)}: {'; '.join(fixes)}"


def config_problems(config: "RunConfig", gpu: bool, support: KernelSupport) -> List[str]:
    """Every invalid kernel / precision / sequence-parallel setting of `config`, one message per flag."""
    problems: List[str] = []
    k, m, p = config.kernels, config.model, config.parallel
    te_impl = k.transformer_impl == "transformer_engine"

    if te_impl:
        missing = _needs_te(gpu, support)
        if missing:
            fixes = (["run on a GPU machine"] if not gpu else []) + [INSTALL_TE]
            fixes.append("or use --transformer-impl local (megatron-core's own layers, CPU and GPU)")
            problems.append(_needs_message("--transformer-impl transformer_engine", missing, fixes))

    problems += _fp8_problems(config, gpu, support)

    if p.sequence_parallel:
        missing, fixes = [], []
        if not gpu:
            missing.append("CUDA GPUs")
            fixes.append("run on GPUs or drop --sequence-parallel (unsupported on CPU)")
        if not te_impl:
            if m.normalization == "RMSNorm":
                missing.append("--transformer-impl transformer_engine")
                fixes.append("megatron-core's local RMSNorm (torch) cannot run sequence parallel: add "
                             "--transformer-impl transformer_engine")
            elif gpu and not support.apex_layer_norm:
                missing.append("apex's fused LayerNorm (or --transformer-impl transformer_engine)")
                fixes.append(f"megatron-core's local LayerNorm needs apex for sequence parallelism: "
                             f"{INSTALL_APEX}, or add --transformer-impl transformer_engine")
        if missing:
            problems.append(_needs_message("--sequence-parallel", missing, fixes))

    problems += _distributed_gpu_problems(config, gpu, support)

    for fusion in FUSIONS:
        if getattr(k, fusion.name) is not True:
            continue
        flag = _flag(fusion.name)
        reason = fusion.not_applicable(config)
        if reason is not None:
            problems.append(f"{flag} does not apply to this model: {reason}, or drop the flag")
            continue
        missing = fusion.missing(gpu, support)
        if missing:
            fixes = []
            if "a CUDA GPU" in missing:
                fixes.append("run on a GPU machine")
            if any("apex" in what for what in missing):
                fixes.append(INSTALL_APEX)
            if "Transformer Engine" in missing:
                fixes.append(INSTALL_TE)
            fixes.append(f"or drop {flag} (without it the fusion is used where its kernel exists; "
                         f"--no-{flag[2:]} turns it off)")
            problems.append(_needs_message(flag, missing, fixes))
    return problems


def _fp8_problems(config: "RunConfig", gpu: bool, support: KernelSupport) -> List[str]:
    k, m, p, t = config.kernels, config.model, config.parallel, config.training
    problems: List[str] = []
    tuning = {
        "--fp8-recipe": k.fp8_recipe,
        "--fp8-margin": k.fp8_margin,
        "--fp8-amax-history-len": k.fp8_amax_history_len,
        "--fp8-amax-compute-algo": k.fp8_amax_compute_algo,
    }
    given = [name for name, value in tuning.items() if value is not None]
    if k.fp8_format is None:
        if given:
            problems.append(f"{', '.join(given)} {_verb(given)} to FP8 training only: add --fp8-format hybrid "
                            f"(or e4m3), or drop {'it' if len(given) == 1 else 'them'}")
        return problems

    flag = f"--fp8-format {k.fp8_format}"
    recipe = k.fp8_recipe or "delayed"
    missing, fixes = [], []
    if not config.optimizer.bf16:
        missing.append("--bf16")
        fixes.append("add --bf16 (FP8 runs the transformer layers' GEMMs in fp8 under bf16 weights and "
                     "activations)")
    if k.transformer_impl != "transformer_engine":
        missing.append("--transformer-impl transformer_engine")
        fixes.append("add --transformer-impl transformer_engine (megatron-core's local layers have no FP8)")
    needed_cc = MXFP8_MIN_COMPUTE_CAPABILITY if recipe == "mxfp8" else FP8_MIN_COMPUTE_CAPABILITY
    gpu_words = ("a Blackwell GPU for --fp8-recipe mxfp8 (compute capability 10.0+)" if recipe == "mxfp8"
                 else "a GPU with FP8 (compute capability 8.9+: H100, L40S, ...)")
    if not gpu:
        missing.append(gpu_words)
        fixes.append("run on such a GPU or drop --fp8-format")
    elif support.compute_capability is not None and tuple(support.compute_capability) < needed_cc:
        major, minor = support.compute_capability
        missing.append(f"{gpu_words}, this one is {major}.{minor}")
        fixes.append("run on such a GPU" + (" or use --fp8-recipe delayed" if recipe == "mxfp8" else "")
                     + " or drop --fp8-format")
    if missing:
        problems.append(_needs_message(flag, missing, fixes))

    # Amax history and margin belong to delayed scaling; the current-scaling recipes ignore them.
    delayed_only = [name for name in ("--fp8-margin", "--fp8-amax-history-len", "--fp8-amax-compute-algo")
                    if tuning[name] is not None]
    if recipe != "delayed" and delayed_only:
        problems.append(f"{', '.join(delayed_only)} {_verb(delayed_only)} to --fp8-recipe delayed only (this "
                        f"run uses {recipe}): drop {'it' if len(delayed_only) == 1 else 'them'} or use "
                        "--fp8-recipe delayed")
    if k.fp8_amax_history_len is not None and k.fp8_amax_history_len < 1:
        problems.append("--fp8-amax-history-len must be >= 1")
    if k.fp8_margin is not None and k.fp8_margin < 0:
        problems.append("--fp8-margin must be >= 0")

    # Transformer Engine runs an FP8 GEMM only on inputs whose rows are a multiple of 8 and columns of 16.
    tp = max(p.tensor_model_parallel_size, 1)
    tokens = m.seq_length * t.micro_batch_size // (tp if p.sequence_parallel else 1)
    shapes = {
        "--hidden-size": m.hidden_size,
        "--ffn-hidden-size / TP": (m.ffn_hidden_size or 4 * m.hidden_size) // tp,
    }
    bad = [f"{name} = {value}" for name, value in shapes.items() if value % 16]
    if tokens % 8:
        bad.append(f"tokens per micro-batch and rank (--seq-length * --micro-batch-size"
                   f"{' / TP' if p.sequence_parallel else ''}) = {tokens} (needs a multiple of 8)")
    if bad:
        problems.append(f"{flag}: Transformer Engine's FP8 GEMMs need multiples of 16 in the feature "
                        f"dimensions and of 8 in the tokens; got {', '.join(bad)}")
    return problems


def _distributed_gpu_problems(config: "RunConfig", gpu: bool, support: KernelSupport) -> List[str]:
    """Communication features built on Transformer Engine: --tp-comm-overlap (userbuffers), --fp8-param-gather
    (fp8 weights) and --context-parallel-size > 1 (TE's ring attention)."""
    k, p, m = config.kernels, config.parallel, config.model
    te_impl = k.transformer_impl == "transformer_engine"
    problems: List[str] = []

    def needs_te_layers(flag: str, missing: List[str], fixes: List[str]) -> None:
        if not gpu:
            missing.append("CUDA GPUs")
            fixes.append(f"run on GPUs or drop {flag} (unsupported on CPU)")
        elif not support.transformer_engine:
            missing.append("Transformer Engine")
            fixes.append(INSTALL_TE)
        if not te_impl:
            missing.append("--transformer-impl transformer_engine")
            fixes.append("add --transformer-impl transformer_engine")

    if p.tp_comm_overlap:
        missing, fixes = [], []
        needs_te_layers("--tp-comm-overlap", missing, fixes)
        if not p.sequence_parallel:
            missing.append("--sequence-parallel")
            fixes.append("add --sequence-parallel (the overlapped all-gather / reduce-scatter are sequence "
                         "parallelism's)")
        if missing:
            problems.append(_needs_message("--tp-comm-overlap", missing, fixes))

    if k.fp8_param_gather:
        missing, fixes = [], []
        needs_te_layers("--fp8-param-gather", missing, fixes)
        if k.fp8_format is None:
            missing.append("--fp8-format")
            fixes.append("add --fp8-format hybrid (the weights are Transformer Engine's fp8 tensors)")
        if not p.use_distributed_optimizer:
            missing.append("--use-distributed-optimizer")
            fixes.append("add --use-distributed-optimizer (its all-gather moves the fp8 weights)")
        if missing:
            problems.append(_needs_message("--fp8-param-gather", missing, fixes))

    if "layernorm" in (config.recompute.recompute_modules or ()) and not (gpu and support.transformer_engine):
        # megatron-core 0.16.1's output-discarding checkpoint (CheckpointWithoutOutput, which recomputes the
        # norms) asks Transformer Engine for the FP8 state even in bf16/fp32 runs, and fails without it.
        missing = ["CUDA GPUs"] if not gpu else []
        problems.append(_needs_message("--recompute-modules layernorm", missing + ["Transformer Engine"],
                                       [f"{INSTALL_TE} (megatron-core's norm recomputation queries its FP8 "
                                        "state)", "or recompute core_attn / mlp only"]))

    cp = p.context_parallel_size
    if cp > 1:
        flag = f"--context-parallel-size {cp}"
        missing, fixes = [], []
        needs_te_layers(flag, missing, fixes)
        if m.seq_length % (2 * cp):
            missing.append(f"--seq-length divisible by 2 * CP = {2 * cp}")
            fixes.append(f"use a --seq-length that is a multiple of {2 * cp} (each rank takes two of the 2 * CP "
                         f"chunks of a sequence, as Megatron-LM)")
        if missing:
            problems.append(_needs_message(flag, missing, fixes))
    return problems
