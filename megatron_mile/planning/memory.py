"""Per-GPU memory and step time of a training run, from its flags, before any GPU is booked.

Everything is counted from the model shape and the parallel layout:

- weights, gradients, optimizer states: exact parameter counts of megatron-core's GPTModel (local or
  Transformer Engine spec: same parameters) per tensor-parallel rank and pipeline stage, times the bytes
  this project keeps per parameter: the model copy in the compute dtype, gradients in fp32 (the DDP
  buffer reduces in fp32: megatron_mile.training.optimizer), and for Adam the m and v moments in fp32 plus,
  with bf16/fp8, an fp32 master copy; the distributed optimizer shards those over the data-parallel ranks.
- activations: the tensors each layer saves for backward, per token, in the notation of Korthikanti et al.,
  "Reducing Activation Recomputation in Large Transformer Models" (2022). Their GPT layer keeps
  34*s*b*h + 5*a*s^2*b bytes (bf16, dropout on). This module enumerates the same tensors for a LLaMA layer
  (RMSNorm, SwiGLU, grouped-query attention, rope) as megatron-core runs it, once per implementation:
    * device "gpu": Transformer Engine layers (fused norm+linear, flash attention: no s^2 term, fused
      SwiGLU keeping the fc1 output only);
    * device "cpu": megatron-core's local layers with torch fallbacks, as this project runs without a GPU:
      the norm keeps its input and its normalised output, attention materialises the [b, a, s, s] scores
      and keeps the softmax in fp32, the SwiGLU keeps silu(x) and the gated half besides the fc1 output.
  The cpu profile is what tests/test_plan_memory.py checks against memory measured on CPU, with and
  without recomputation (Megatron-LM's --recompute-granularity): selective keeps the core attention's
  inputs only (no s^2 scores, softmax or attention-dropout masks); full keeps each recomputed group's input
  (--recompute-method uniform: one per --recompute-num-layers layers; block: the first N layers of a stage)
  plus, in backward, one group's activations.
  Pipeline parallelism: with 1F1B the first stage holds min(PP, micro-batches) micro-batches in flight,
  the interleaved schedule (1 + (PP - 1) / (PP * v)) times that (Korthikanti et al., section 4.2.3).
- logits and loss: the last stage keeps [s, b, V/tp] logits in the compute dtype; the loss
  (megatron_mile.loss.vocab_parallel) keeps only per-token vectors and fp32 chunk buffers of CHUNK_ELEMENTS
  floats (4 MiB) in forward (two; one for fp32 logits, whose exp it keeps in place); backward writes the
  logits' gradient into a new tensor of the logits' dtype, or into the logits themselves when they are
  fp32 (the model's loss hook opts in).
- FLOPs: 6 * (matmul parameters) * tokens + 12 * layers * hidden * seq * tokens (attention scores and
  values, counted over the full s x s square as Megatron-LM does), and the time per step at a given MFU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

from megatron_mile.loss import CHUNK_ELEMENTS
from megatron_mile.parallel import virtual_pipeline_size
from megatron_mile.vocab import padded_vocab_size

# Peak dense bf16 tensor throughput, TFLOP/s per GPU (vendor data sheets, without sparsity).
GPU_PEAK_TFLOPS: Dict[str, float] = {"H100": 989.0, "A100": 312.0, "H200": 989.0}
# Memory per GPU, GB (10^9 bytes) as sold: H100 SXM 80 GB, A100 80 GB variant, H200 141 GB.
GPU_MEMORY_GB: Dict[str, float] = {"H100": 80.0, "A100": 80.0, "H200": 141.0}
# Not modelled term by term on GPUs: CUDA context, cuBLAS/NCCL workspaces and caching-allocator
# fragmentation. A few GB in practice; we reserve this much when saying whether a plan fits.
GPU_RESERVED_BYTES = 4 * 10**9

# Per token, the loss keeps: log-sum-exp and max (fp32), owned-target index (int64), flags (bool), the
# packed [ce, weight, entropy] output and statistics (fp32): a generous round figure, O(tokens) only.
LOSS_BYTES_PER_TOKEN = 64

PRECISIONS = ("bf16", "fp32", "fp8")
RECOMPUTE = ("none", "selective", "full")
DEVICES = ("gpu", "cpu")


class PlanError(ValueError):
    """An impossible plan: the message says which setting to change."""


@dataclass
class ModelShape:
    """The transformer's shape (megatron-core GPTModel; LLaMA when swiglu/rmsnorm/rope/untied)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    num_query_groups: Optional[int] = None
    swiglu: bool = True
    untie_embeddings_and_output_weights: bool = True
    normalization: str = "RMSNorm"
    add_bias_linear: bool = False
    position_embedding_type: str = "rope"
    max_position_embeddings: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_size(self) -> int:
        """Width of the key (or value) projection: query groups * head dim."""
        return self.groups * self.head_dim


@dataclass
class Layout:
    """Parallel layout, batch, precision and memory-saving options of the run."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    layers_per_virtual_stage: Optional[int] = None
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    precision: str = "bf16"
    distributed_optimizer: bool = False
    recompute: str = "none"  # Megatron-LM's --recompute-granularity, or "none"
    recompute_method: str = "uniform"  # with recompute "full": uniform or block (--recompute-method)
    recompute_num_layers: int = 1  # with recompute "full": --recompute-num-layers
    sequence_parallel: bool = False
    device: str = "gpu"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def num_micro_batches(self) -> int:
        gbs = self.global_batch_size or self.micro_batch_size * self.data_parallel
        return gbs // (self.micro_batch_size * self.data_parallel)


def padded_vocab(shape: ModelShape, tp: int) -> int:
    """Megatron's padded vocabulary of this shape at TP size `tp` (megatron_mile.vocab.padded_vocab_size)."""
    return padded_vocab_size(shape.vocab_size, tp, shape.make_vocab_size_divisible_by)


def check(shape: ModelShape, layout: Layout) -> None:
    """Raise PlanError listing every impossible setting."""
    problems = []
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    if shape.hidden_size % shape.num_attention_heads:
        problems.append(f"--num-attention-heads {shape.num_attention_heads} does not divide --hidden-size")
    if shape.num_attention_heads % tp or shape.groups % tp:
        problems.append(f"TP {tp} must divide the attention heads ({shape.num_attention_heads}) and query "
                        f"groups ({shape.groups})")
    if shape.ffn_hidden_size % tp:
        problems.append(f"TP {tp} does not divide --ffn-hidden-size {shape.ffn_hidden_size}")
    if shape.num_layers % pp:
        problems.append(f"PP {pp} does not divide --num-layers {shape.num_layers}")
    v = layout.layers_per_virtual_stage
    if v is not None and (pp < 2 or shape.num_layers % (pp * v)):
        problems.append(f"--num-layers-per-virtual-pipeline-stage {v} needs PP > 1 and PP * {v} dividing "
                        f"--num-layers {shape.num_layers}")
    gbs = layout.global_batch_size
    if gbs is not None and gbs % (layout.micro_batch_size * layout.data_parallel):
        problems.append(f"--global-batch-size {gbs} is not divisible by micro-batch * DP = "
                        f"{layout.micro_batch_size} * {layout.data_parallel}")
    if layout.precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {layout.precision!r}")
    if layout.recompute not in RECOMPUTE:
        problems.append(f"recompute must be one of {RECOMPUTE}, got {layout.recompute!r}")
    if layout.recompute == "full":
        chunk_layers = v if v is not None else shape.num_layers // pp
        n = layout.recompute_num_layers
        if layout.recompute_method not in ("uniform", "block"):
            problems.append(f"--recompute-method must be uniform or block, got {layout.recompute_method!r}")
        elif not 1 <= n <= chunk_layers or (layout.recompute_method == "uniform" and chunk_layers % n):
            problems.append(f"--recompute-num-layers {n} must lie in 1..{chunk_layers} (the layers of a pipeline "
                            f"stage){' and divide them (uniform)' if layout.recompute_method == 'uniform' else ''}")
    if layout.device not in DEVICES:
        problems.append(f"device must be one of {DEVICES}, got {layout.device!r}")
    if layout.sequence_parallel and (tp < 2 or layout.device == "cpu"):
        problems.append("--sequence-parallel needs TP > 1 on GPUs")
    if layout.device == "cpu" and layout.precision == "fp8":
        problems.append("fp8 needs Transformer Engine on GPUs: use --device gpu")
    if problems:
        raise PlanError("impossible plan:\n" + "\n".join(f"  - {p}" for p in problems))


# -- parameters ---------------------------------------------------------------------------------------------


def layer_parameters(shape: ModelShape, tp: int = 1) -> int:
    """Parameters of one transformer layer held by one tensor-parallel rank."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    norm = 2 * h if shape.normalization == "LayerNorm" else h  # weight (+ bias)
    qkv_out = h + 2 * shape.kv_size  # column-parallel: split over TP
    fc1_out = 2 * f if shape.swiglu else f  # column-parallel
    weights = (h * qkv_out + h * h + h * fc1_out + f * h) // tp
    biases = 0
    if shape.add_bias_linear:
        # Column-parallel biases are split; row-parallel (proj, fc2) biases are whole on every rank.
        biases = (qkv_out + fc1_out) // tp + 2 * h
    return 2 * norm + weights + biases


def stage_parameters(shape: ModelShape, tp: int = 1, pp: int = 1, stage: int = 0) -> int:
    """Parameters one rank holds in pipeline stage `stage` (all its virtual chunks together)."""
    h, vp = shape.hidden_size, padded_vocab(shape, tp)
    count = shape.num_layers // pp * layer_parameters(shape, tp)
    first, last = stage == 0, stage == pp - 1
    if first:
        count += vp // tp * h
        if shape.position_embedding_type == "learned_absolute":
            count += (shape.max_position_embeddings or shape.seq_length) * h
    if last:
        count += 2 * h if shape.normalization == "LayerNorm" else h  # final norm
        # Untied: the output layer. Tied with PP > 1: the last stage keeps its own copy of the embedding.
        if shape.untie_embeddings_and_output_weights or not first:
            count += vp // tp * h
    return count


def total_parameters(shape: ModelShape) -> int:
    """Parameters of the whole model (TP = PP = 1), the padded vocabulary included."""
    return stage_parameters(shape, 1, 1, 0)


def matmul_parameters(shape: ModelShape) -> int:
    """Weights that multiply every token (layer projections + output layer): no norms, biases or lookups."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    per_layer = h * (h + 2 * shape.kv_size) + h * h + h * (2 * f if shape.swiglu else f) + f * h
    return shape.num_layers * per_layer + padded_vocab(shape, 1) * h


# -- activations -------------------------------------------------------------------------------------------


def _compute_bytes(layout: Layout) -> int:
    return 4 if layout.precision == "fp32" else 2


def layer_activation_bytes(shape: ModelShape, layout: Layout, micro_batch: Optional[int] = None) -> Dict[str, float]:
    """Bytes one layer saves for backward for one micro-batch on one TP rank, by part (with selective
    recomputation, what it still saves; full recomputation is counted per stage: stage_activation_bytes)."""
    s, b = shape.seq_length, micro_batch or layout.micro_batch_size
    h, f, kv, a = shape.hidden_size, shape.ffn_hidden_size, shape.kv_size, shape.num_attention_heads
    t = layout.tensor_parallel
    e = _compute_bytes(layout)
    # Saved inputs of the TP-replicated part (norms, linear inputs before the column-parallel split):
    # replicated without sequence parallelism, split over TP with it (Korthikanti et al., section 4.2.2).
    rep = t if layout.sequence_parallel else 1
    tokens = s * b
    parts: Dict[str, float] = {}
    if layout.device == "cpu":
        # The torch-fallback RMSNorm keeps its input and x * rsqrt(mean(x^2)) (before the weight); the
        # linear after it keeps the norm's output: 3h per norm + linear (attention and MLP blocks).
        # Linear inputs not after a norm: the projection (h) and fc2 (f).
        parts["norms and linear inputs"] = tokens * e * 6 * h / rep + tokens * e * (h + f) / t
        # q after rope (h); k and v: repeated to all heads with GQA (h each); without GQA, v is a view of
        # the fused qkv projection output and keeps all of it alive (h + 2kv), k after rope is its own h.
        grouped = shape.groups != a
        qkv = h + h + (h if grouped else h + 2 * kv)
        parts["attention q/k/v"] = tokens * e * qkv / t
        # Scores: softmax runs in fp32 and keeps its output; in bf16 a cast copy feeds the value matmul.
        score_elems = a / t * s * s * b
        parts["attention scores (s^2)"] = score_elems * (4 + (e if e != 4 else 0))
        # SwiGLU: fc1 output (2f), silu(x) (f), the gated half plus its offset (f); GeLU keeps its input.
        parts["mlp"] = tokens * e * (4 * f if shape.swiglu else f) / t
        mask_bytes = e  # CPU dropout keeps a mask in the input dtype
    else:
        lin = 1 if layout.precision == "fp8" else e  # TE keeps fp8 copies of linear inputs under fp8
        # TE fused norm+linear: the norm input (e) and its output, kept as the linear's input (lin),
        # for the attention and the MLP block.
        parts["norms and linear inputs"] = tokens * (2 * h * e + 2 * h * lin) / rep + tokens * (h + f) * lin / t
        # Flash attention: q, k, v and the output (which is also the projection's input, counted above
        # as h * lin: the output here is the e-byte tensor the attention kernel itself saves).
        parts["attention q/k/v"] = tokens * e * (h + 2 * kv + h) / t + tokens * a / t * 4  # + softmax lse
        parts["attention scores (s^2)"] = 0.0
        # Fused SwiGLU keeps only its input, the fc1 output (2f); GeLU keeps its input (f).
        parts["mlp"] = tokens * e * (2 * f if shape.swiglu else f) / t
        mask_bytes = 1
    masks = 0.0
    if shape.hidden_dropout > 0:
        masks += 2 * tokens * h * mask_bytes / rep  # after attention and after the MLP
    if shape.attention_dropout > 0 and layout.device == "cpu":
        masks += a / t * s * s * b * (mask_bytes + e)  # mask and dropped-out probabilities
    parts["dropout masks"] = masks
    if layout.recompute == "selective":
        # Recomputing the core attention (megatron's default --recompute-modules core_attn) keeps only the
        # checkpoint's inputs, q and k after rope and v (Korthikanti's selective recomputation): the s^2
        # scores, the softmax and the attention-dropout masks go.
        parts["attention scores (s^2)"] = 0.0
        if layout.device == "cpu":
            # v is a view of the fused qkv projection output, which it keeps alive (h + 2kv); the grouped-query
            # repetition of k and v to all heads happens inside the checkpoint and is not kept.
            parts["attention q/k/v"] = tokens * e * (h + kv + h + 2 * kv) / t
            parts["dropout masks"] = 2 * tokens * h * mask_bytes / rep if shape.hidden_dropout > 0 else 0.0
        else:
            # The flash kernel's own output copy and softmax statistics are recomputed too.
            parts["attention q/k/v"] = tokens * e * (h + 2 * kv) / t
    return parts


def recompute_working_set_bytes(shape: ModelShape, layout: Layout) -> float:
    """Full recomputation: the activations backward rebuilds at once, one recomputed group's (a group of
    --recompute-num-layers layers with uniform, one layer with block); 0 otherwise."""
    if layout.recompute != "full":
        return 0.0
    group = 1 if layout.recompute_method == "block" else layout.recompute_num_layers
    return group * sum(layer_activation_bytes(shape, layout).values())


def stage_activation_bytes(shape: ModelShape, layout: Layout, stage: int,
                           include_recompute_working_set: bool = True) -> float:
    """Activation bytes held at the peak of a step by one rank of pipeline stage `stage` (logits excluded):
    what forward keeps for backward and, with full recomputation, the working set backward rebuilds
    (`include_recompute_working_set=False`: only what is held at the end of forward)."""
    pp, t = layout.pipeline_parallel, layout.tensor_parallel
    layers = shape.num_layers // pp
    tokens = shape.seq_length * layout.micro_batch_size
    e = _compute_bytes(layout)
    rep = t if layout.sequence_parallel else 1
    per_layer = sum(layer_activation_bytes(shape, layout).values())
    layer_input = tokens * shape.hidden_size * e / rep
    if layout.recompute == "full" and layout.recompute_method == "block":
        # The first n layers of the stage keep only their inputs, the others everything.
        n = layout.recompute_num_layers
        held_per_mb = min(n, layers) * layer_input + max(layers - n, 0) * per_layer
    elif layout.recompute == "full":
        # uniform: each group of n layers keeps only the group's input.
        held_per_mb = -(-layers // layout.recompute_num_layers) * layer_input
    else:
        held_per_mb = layers * per_layer
    transient = recompute_working_set_bytes(shape, layout) if include_recompute_working_set else 0.0
    if stage == 0:
        # 1F1B: the first stage runs min(pp, micro-batches) forwards before its first backward.
        in_flight = float(min(pp, layout.num_micro_batches))
        if layout.layers_per_virtual_stage is not None and pp > 1:
            # Interleaved 1F1B with v model chunks per rank: its longer warm-up keeps
            # pp * (1 + (pp - 1) / (pp * v)) micro-batches' worth of the rank's layers.
            v = virtual_pipeline_size(shape.num_layers, pp, layout.layers_per_virtual_stage)
            in_flight = pp * (1 + (pp - 1) / (pp * v))
    else:
        # Stage k of 1F1B holds pp - k micro-batches; the last stage one.
        in_flight = float(min(pp - stage, layout.num_micro_batches))
    held = in_flight * held_per_mb + transient
    if stage == pp - 1:
        # Final norm (input + output; the cpu fallback keeps one more copy) and the output layer's input.
        held += tokens * shape.hidden_size * e * (3 if layout.device == "cpu" else 2) / rep
    return held


def attention_backward_extra_bytes(shape: ModelShape, layout: Layout, last_stage: bool = True) -> float:
    """How far backward's peak exceeds the activations held at the end of forward, apart from the logits and
    the loss (counted separately; the plan takes the higher of the two). Negative: never above them.

    With materialised attention (cpu profile, last stage), backward through one layer's scores holds three
    [b, a/tp, s, s] fp32 tensors at once (the probabilities' gradient, the softmax's input gradient, the
    masked copy of it), while that layer's MLP block, the final norm and the logits are already freed; with
    selective recomputation the rebuilt core attention's s^2 tensors come on top. Flash attention (gpu
    profile) keeps backward transients at O(s * b * h): nothing comparable. Full recomputation rebuilds one
    group of layers (recompute_working_set_bytes) once the logits are freed and, with --recompute-method
    block, once the stage's last, not recomputed layers have given their activations back.
    """
    s, b, t = shape.seq_length, layout.micro_batch_size, layout.tensor_parallel
    e = _compute_bytes(layout)
    h, f = shape.hidden_size, shape.ffn_hidden_size
    tokens = s * b
    cpu = layout.device == "cpu"
    parts = layer_activation_bytes(shape, layout)
    scores = shape.num_attention_heads / t * s * s * b * 4
    # CPU: a layer's attention backward, its MLP block and that block's inputs freed by then.
    attention = 3 * scores - parts["mlp"] - tokens * e * (3 * h + f) if cpu and last_stage else 0.0
    rep = t if layout.sequence_parallel else 1
    final_norm = tokens * h * e * (3 if cpu else 2) / rep if last_stage else 0.0  # freed with the output layer
    if layout.recompute == "full":
        layers = shape.num_layers // layout.pipeline_parallel
        kept = max(layers - layout.recompute_num_layers, 0) if layout.recompute_method == "block" else 0
        rebuilt = recompute_working_set_bytes(shape, layout) - kept * sum(parts.values()) + attention - final_norm
        # block: the last layers keep everything and are back-propagated first, as without recomputation.
        return max(rebuilt, attention - final_norm) if kept and cpu else rebuilt
    if not cpu or not last_stage:
        return 0.0
    extra = attention - final_norm
    if layout.recompute == "selective":
        # The recomputed core attention first rebuilds what it keeps for its own backward: the s^2 part
        # (fp32 softmax, cast copy, attention-dropout masks) that the selective plan does not hold.
        kept_parts = layer_activation_bytes(shape, replace(layout, recompute="none"))
        extra += kept_parts["attention scores (s^2)"] + kept_parts["dropout masks"] - parts["dropout masks"]
    return extra


def logits_and_loss_bytes(shape: ModelShape, layout: Layout) -> Dict[str, float]:
    """Last stage: logits, the loss's forward memory and the backward's extra allocations, per TP rank."""
    t = layout.tensor_parallel
    tokens = shape.seq_length * layout.micro_batch_size
    e = _compute_bytes(layout)
    vocab_shard = padded_vocab(shape, t) // t
    logits = tokens * vocab_shard * e
    # fp32 logits are overwritten by their gradient (no allocation); otherwise one new tensor.
    logits_grad = 0.0 if e == 4 else float(logits)
    # The output layer's backward: its weight gradient (param dtype) and the input gradient [s, b, h].
    output_backward = float(vocab_shard * shape.hidden_size * e + tokens * shape.hidden_size * e)
    # The loss forward's fp32 chunk buffers hold min(CHUNK_ELEMENTS // v, tokens) rows each and are freed
    # before backward allocates anything, so only what they exceed the backward's allocations by counts.
    # Two of them; one with fp32 logits, whose exp(z - m) the loss writes over the logits themselves.
    chunk_rows = min(max(1, CHUNK_ELEMENTS // vocab_shard), tokens)
    chunk_buffers = (1.0 if e == 4 else 2.0) * chunk_rows * vocab_shard * 4
    return {
        "logits": float(logits),
        "loss per-token vectors (kept for backward)": float(tokens * LOSS_BYTES_PER_TOKEN),
        "loss backward (logits gradient)": logits_grad,
        "output layer backward": output_backward,
        "loss forward chunk buffers (beyond the backward's)": max(0.0, chunk_buffers - logits_grad - output_backward),
    }


# -- the plan ----------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Per-GPU memory (bytes) of the busiest rank, its parts, FLOPs and time per step.

    activations: what forward keeps for backward (with full recomputation, the recomputed groups' inputs);
    attention_backward_extra: how far backward's peak exceeds logits_and_loss on top of that (CPU attention
    backward, or full recomputation's rebuilt group); total = weights + gradients + optimizer_states +
    activations + logits_and_loss + attention_backward_extra.
    """

    parameters_total: int
    parameters_per_rank: List[int]
    weights: float
    gradients: float
    optimizer_states: float
    activations: float
    logits_and_loss: float
    attention_backward_extra: float
    peak_stage: int
    total: float
    capacity: Optional[float]
    fits: Optional[bool]
    flops_per_step: float
    step_time_s: Optional[float]
    tokens_per_step: int
    details: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def flops_per_step(shape: ModelShape, layout: Layout) -> float:
    """Model FLOPs of one optimizer step: 6 * N_matmul * T + 12 * L * h * s * T (forward + backward).

    Recomputation is not counted (MFU is defined on model FLOPs, as in Megatron-LM's reports).
    """
    tokens = shape.seq_length * (layout.global_batch_size or layout.micro_batch_size * layout.data_parallel)
    return 6.0 * matmul_parameters(shape) * tokens + 12.0 * shape.num_layers * shape.hidden_size * shape.seq_length * tokens


def plan(shape: ModelShape, layout: Layout, gpu: str = "H100", mfu: float = 0.4) -> MemoryPlan:
    """The memory of every pipeline stage's rank; the plan reports the largest, with its breakdown."""
    check(shape, layout)
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    weight_bytes = 4 if layout.precision == "fp32" else 2
    # Adam m and v in fp32; bf16/fp8 add the fp32 master weights (12 bytes); fp32 needs no master copy.
    optimizer_bytes_per_param = 8 if layout.precision == "fp32" else 12
    per_rank = [stage_parameters(shape, tp, pp, st) for st in range(pp)]
    best: Optional[dict] = None
    for st, params in enumerate(per_rank):
        weights = params * weight_bytes
        if layout.precision == "fp8":
            weights += params  # Transformer Engine's cached fp8 copies of the weights
        gradients = params * 4.0  # the DDP buffer reduces in fp32 (grad_reduce_in_fp32)
        opt = params * optimizer_bytes_per_param / (dp if layout.distributed_optimizer else 1)
        # What forward keeps for backward (with full recomputation: the groups' inputs).
        act = stage_activation_bytes(shape, layout, st, include_recompute_working_set=False)
        loss_parts = logits_and_loss_bytes(shape, layout) if st == pp - 1 else {}
        lal = sum(loss_parts.values())
        # The step's peak above that: the output layer's backward, or (CPU attention) the last layer's
        # attention backward, or full recomputation's rebuilt group, whichever is higher.
        extra = attention_backward_extra_bytes(shape, layout, last_stage=st == pp - 1)
        total = weights + gradients + opt + act + max(lal, extra)
        if best is None or total > best["total"]:
            best = dict(stage=st, weights=weights, gradients=gradients, opt=opt, act=act, lal=lal,
                        total=total, loss_parts=loss_parts, extra=max(0.0, extra - lal))
    assert best is not None
    capacity = fits = step_time = None
    flops = flops_per_step(shape, layout)
    if layout.device == "gpu":
        if gpu not in GPU_PEAK_TFLOPS:
            raise PlanError(f"unknown GPU {gpu!r}; known: {sorted(GPU_PEAK_TFLOPS)}")
        if not 0 < mfu <= 1:
            raise PlanError(f"--mfu must lie in (0, 1], got {mfu}")
        capacity = GPU_MEMORY_GB[gpu] * 1e9
        fits = best["total"] + GPU_RESERVED_BYTES <= capacity
        step_time = flops / (layout.world_size * GPU_PEAK_TFLOPS[gpu] * 1e12 * mfu)
    details = {f"activations per layer and micro-batch: {k}": v
               for k, v in layer_activation_bytes(shape, layout).items()}
    details["activations: full recomputation's working set in backward"] = recompute_working_set_bytes(shape, layout)
    details.update({f"logits/loss: {k}": v for k, v in best["loss_parts"].items()})
    return MemoryPlan(
        parameters_total=total_parameters(shape),
        parameters_per_rank=per_rank,
        weights=best["weights"],
        gradients=best["gradients"],
        optimizer_states=best["opt"],
        activations=best["act"],
        logits_and_loss=best["lal"],
        attention_backward_extra=best["extra"],
        peak_stage=best["stage"],
        total=best["total"],
        capacity=capacity,
        fits=fits,
        flops_per_step=flops,
        step_time_s=step_time,
        tokens_per_step=shape.seq_length * (layout.global_batch_size or layout.micro_batch_size * dp),
        details=details,
    )
