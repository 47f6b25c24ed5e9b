"""The layer sections of a run's configuration: activation recomputation, and the layer implementation with
its fused kernels (Transformer Engine, FP8, apex / jit fusions, the fused LM head)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional

from megatron_mile.config.fields import flag


# Submodules megatron-core's selective recomputation knows (TransformerConfig.recompute_modules).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe_act", "moe", "shared_experts", "mla_up_proj")


@dataclass
class RecomputeConfig:
    """Activation recomputation: keep fewer activations in forward and recompute them in backward
    (megatron-core's TransformerConfig; Korthikanti et al., 2022). Dropout replays the same random numbers."""

    recompute_activations: bool = False
    """Recompute activations to fit larger models, sequences and batches: --recompute-granularity selective."""
    recompute_granularity: Optional[str] = flag(None, choices=["full", "selective"])
    """selective: recompute --recompute-modules (default core_attn: attention scores, softmax and dropout,
    memory-heavy and cheap); full: keep only each recomputed group of layers' input (needs
    --recompute-method and --recompute-num-layers). Default: none."""
    recompute_method: Optional[str] = flag(None, choices=["uniform", "block"])
    """With full: uniform recomputes each stage's layers in groups of --recompute-num-layers; block recomputes
    the first --recompute-num-layers layers of each stage and keeps all activations of the others."""
    recompute_num_layers: Optional[int] = None
    """With full: layers per group (uniform), or recomputed layers per pipeline stage (block)."""
    recompute_modules: Optional[List[str]] = flag(None, nargs="+", choices=list(RECOMPUTE_MODULES))
    """With selective: core_attn, mlp and/or layernorm (the local layers' norms; needs Transformer Engine
    installed); megatron-core's MoE / MLA names are refused (no such layers). Default: core_attn."""

    @property
    def granularity(self) -> Optional[str]:
        """The recomputation in effect: --recompute-activations means selective, as in Megatron-LM."""
        return "selective" if self.recompute_activations else self.recompute_granularity


def _fusion_switch():
    """A fused-kernel switch as Megatron-LM spells it (--no-NAME), plus --NAME to insist on it."""
    return flag(None, action=argparse.BooleanOptionalAction)


@dataclass
class KernelConfig:
    """Layer implementation and fused kernels: Transformer Engine and FP8, apex / jit fusions, the fused LM
    head (megatron_mile.kernels explains what each needs)."""

    transformer_impl: Optional[str] = flag(None, choices=["local", "transformer_engine"])
    """Transformer layers: megatron-core's local modules (CPU and GPU), or Transformer Engine's (GPU; fused
    norm + linear, fused attention; needed for FP8 and for --sequence-parallel with RMSNorm). Default:
    transformer_engine where Transformer Engine is installed and a GPU is visible (Megatron-LM's default),
    local otherwise; the log says which and why."""
    fp8_format: Optional[str] = flag(None, choices=["e4m3", "hybrid"])
    """FP8 GEMMs in the transformer layers (Transformer Engine, needs --bf16 and a GPU with FP8, e.g. H100):
    e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients). The output layer stays bf16 and the loss
    runs in fp32. Default: off."""
    fp8_recipe: Optional[str] = flag(None, choices=["delayed", "tensorwise", "mxfp8", "blockwise"])
    """FP8 scaling recipe: delayed (amax history), tensorwise (current scaling), mxfp8 (Blackwell),
    blockwise. Default: delayed."""
    fp8_margin: Optional[int] = None
    """Delayed scaling: the scale leaves 2^margin of headroom below the fp8 maximum. Default: 0."""
    fp8_amax_history_len: Optional[int] = None
    """Delayed scaling: steps of amax history per tensor. Default: 1."""
    fp8_amax_compute_algo: Optional[str] = flag(None, choices=["most_recent", "max"])
    """Delayed scaling: the amax the scale follows, the latest or the largest in the history.
    Default: most_recent."""
    gradient_accumulation_fusion: Optional[bool] = _fusion_switch()
    """Fuse weight-gradient GEMMs with the accumulation into fp32 main grads (apex's
    fused_weight_gradient_mlp_cuda; GPU). Default: on where available."""
    masked_softmax_fusion: Optional[bool] = _fusion_switch()
    """Fused scale + mask + softmax in the local attention (apex's scaled_masked_softmax_cuda; GPU).
    Default: on where available."""
    bias_dropout_fusion: Optional[bool] = _fusion_switch()
    """Fused bias + dropout + residual add (torch jit; GPU). Default: on where available."""
    bias_swiglu_fusion: Optional[bool] = _fusion_switch()
    """Fused bias + SwiGLU in the MLP with --swiglu (torch jit; GPU). Default: on where available."""
    bias_gelu_fusion: Optional[bool] = _fusion_switch()
    """Fused bias + GeLU in the MLP without --swiglu (torch jit; GPU; needs biases). Default: on where
    available."""
    rope_fusion: Optional[bool] = _fusion_switch()
    """Fused rotary position embedding (Transformer Engine's kernel; GPU). Default: on where available."""
    fp8_param_gather: bool = False
    """Keep the transformer layers' weights in fp8 and all-gather them in fp8 (Transformer Engine FP8
    weights; needs --fp8-format and --use-distributed-optimizer; GPUs with FP8)."""
    fused_lm_head: bool = False
    """Compute the output layer and the loss together in chunks of tokens, without materialising the
    [s, b, V/tp] logits (megatron_mile.loss.fused_linear_cross_entropy): far less memory on the last pipeline stage,
    the same losses and gradients to rounding."""
