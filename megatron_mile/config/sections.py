"""The sections of a run's configuration: dataclasses with a docstring per field, from which the
command-line flags derive (megatron_mile.arguments). Field names are Megatron-LM's flags spelled with
underscores."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_mile.loss.spec import LOSS_TYPES

# The signals --exit-signal accepts (Megatron-LM's choices); SIGKILL cannot be caught, so it is no choice.
EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


def flag(default, **argparse_kwargs):
    """A dataclass field with extra argparse settings (choices, nargs, alias flag names)."""
    return field(default=default, metadata=dict(argparse_kwargs))


@dataclass
class ModelConfig:
    """Transformer shape and regularisation (LLaMA-style when the RMSNorm/SwiGLU/rope flags are set)."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 128
    """Transformer hidden size."""
    ffn_hidden_size: Optional[int] = None
    """MLP hidden size. Default: 4 * hidden_size (LLaMA uses about 8/3 * hidden_size with --swiglu)."""
    num_attention_heads: int = 4
    """Number of attention heads; must divide hidden_size and be divisible by the TP size."""
    group_query_attention: bool = False
    """Use grouped-query attention with --num-query-groups key/value heads."""
    num_query_groups: int = 1
    """Key/value head groups with --group-query-attention."""
    seq_length: int = 128
    """Tokens per training sample."""
    max_position_embeddings: Optional[int] = None
    """Largest position the model supports. Default: --seq-length."""
    normalization: str = flag("LayerNorm", choices=["LayerNorm", "RMSNorm"])
    """Normalisation layer type."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""
    swiglu: bool = False
    """Gated SiLU MLP (SwiGLU), as LLaMA."""
    disable_bias_linear: bool = False
    """No bias in linear layers, as LLaMA."""
    position_embedding_type: str = flag("learned_absolute", choices=["learned_absolute", "rope", "none"])
    """Position embedding type; LLaMA uses rope."""
    rotary_base: int = 10000
    """Base period of the rotary position embeddings."""
    untie_embeddings_and_output_weights: bool = False
    """Separate input embedding and output layer weights, as LLaMA."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation (the paper uses 0.01)."""
    hidden_dropout: float = 0.1
    """Dropout probability after attention and MLP."""
    attention_dropout: float = 0.1
    """Dropout probability on attention scores."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the TP size (padding takes no part in the loss)."""
    # More of Megatron-LM's architecture flags (same names, defaults and meaning).
    kv_channels: Optional[int] = None
    """Projection size of each attention head (queries, keys, values). Default: hidden size / heads."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions rotated by the rotary position embedding."""
    qk_layernorm: bool = False
    """Normalise queries and keys (per head, with --normalization) before the attention product."""
    add_qkv_bias: bool = False
    """Bias in the query/key/value projection even with --disable-bias-linear (as Qwen)."""
    attention_softmax_in_fp32: bool = False
    """Compute the attention softmax in fp32 under --bf16 (the local attention's scaled softmax)."""
    apply_layernorm_1p: bool = False
    """Norm weights stored as (gamma - 1), zero-centred, for weight decay and stability (Transformer Engine or
    apex's fused LayerNorm: GPU)."""
    attention_backend: str = flag("auto", choices=["auto", "local", "unfused", "fused", "flash"])
    """Attention implementation: auto picks the fastest available; local/unfused are megatron-core's own
    (CPU and GPU); fused (cuDNN) and flash need Transformer Engine on a GPU."""


@dataclass
class ParallelConfig:
    """How the model and data are split across processes (data parallel size = world / (TP * PP))."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size: attention heads, MLP and the vocabulary are split across this many ranks."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size: the layers are split into this many stages."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per virtual pipeline stage (interleaved 1F1B schedule); needs PP > 1."""
    sequence_parallel: bool = False
    """Split layer norms and dropout along the sequence over the TP group (GPUs, TP > 1; with RMSNorm it
    needs --transformer-impl transformer_engine, with LayerNorm Transformer Engine or apex)."""
    context_parallel_size: int = 1
    """Context-parallel size: each sequence's tokens split over this many ranks (Transformer Engine's ring
    attention, GPUs); data parallel size = world / (TP * PP * CP)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states and fp32 main weights across data-parallel ranks (ZeRO-1)."""
    distributed_backend: Optional[str] = flag(None, choices=["nccl", "gloo"])
    """Process-group backend. Default: nccl on GPUs, gloo on CPU."""
    overlap_grad_reduce: bool = False
    """Reduce each gradient bucket over data-parallel ranks as soon as the last micro-batch's backward fills
    it (the MiLe normalisation stays exact: docs/scale.md)."""
    align_grad_reduce: bool = flag(True, action=argparse.BooleanOptionalAction)
    """With --overlap-grad-reduce and PP: stages after the first launch their bucket reductions together
    after their last backward (Megatron-LM's default); --no-align-grad-reduce: each during its backward."""
    overlap_param_gather: bool = False
    """With --use-distributed-optimizer and --overlap-grad-reduce: all-gather the updated parameters bucket
    by bucket during the next forward instead of after the optimizer step."""
    align_param_gather: bool = flag(True, action=argparse.BooleanOptionalAction)
    """With --overlap-param-gather and the interleaved schedule (only there, as in Megatron-LM): stages launch
    their first all-gathers together (default); --no-align-param-gather: each when its forward needs them."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient bucket with --overlap-grad-reduce. Default: max(40M, 1M * DP), megatron's."""
    ddp_average_in_collective: bool = False
    """Average gradients in the data-parallel collective. Refused: the weighted loss sums them and divides
    once by the global weight sum (docs/scale.md)."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with the GEMMs (Transformer Engine userbuffers; GPUs, needs
    --sequence-parallel and --transformer-impl transformer_engine)."""


@dataclass
class LossConfig:
    """The training objective. `lm loss` is always logged as plain cross-entropy, whatever is trained."""

    loss_type: str = flag("cross_entropy", choices=list(LOSS_TYPES))
    """cross_entropy, focal (weights (1 - p_target)^gamma), mile (weights (sigma + entropy)^gamma), dft
    (weights p_target), or a token selection: entropy_selection / ce_selection (weight 1 for the
    --selection-fraction highest-entropy / highest-cross-entropy loss-masked tokens of each micro-batch, 0 for
    the others). docs/loss-internals.md: adding another."""
    mile_gamma: Optional[float] = None
    """MiLe exponent gamma (default 1.0, as in the paper); 0 gives cross-entropy."""
    mile_sigma: Optional[float] = None
    """MiLe offset sigma > 0 (default 1.0, as in the paper)."""
    mile_entropy_threshold: Optional[float] = None
    """MiLe variant: tokens whose normalised entropy H / ln(V) is below this get weight 1. Off by default."""
    focal_gamma: Optional[float] = None
    """Focal-loss exponent gamma (default 1.0)."""
    label_smoothing: float = 0.0
    """Label smoothing alpha in [0, 1) as megatron-core defines it (1 - alpha on the target, alpha spread over
    the other tokens); with any --loss-type."""
    z_loss_coeff: float = 0.0
    """z-loss coefficient: adds coeff * log(Z)^2 per token (PaLM uses 1e-4), weighted and normalised as the
    main loss, logged as `z loss`; with any --loss-type."""
    selection_fraction: Optional[float] = None
    """entropy_selection / ce_selection: the share k in (0, 1] of each micro-batch's loss-masked tokens
    (over all data-parallel ranks) that is trained on (default 0.6, the share Rho-1 keeps); docs/mile-loss.md."""

    @property
    def gamma(self) -> float:
        if self.loss_type == "mile":
            return 1.0 if self.mile_gamma is None else self.mile_gamma
        if self.loss_type == "focal":
            return 1.0 if self.focal_gamma is None else self.focal_gamma
        return 0.0

    @property
    def sigma(self) -> float:
        return 1.0 if self.mile_sigma is None else self.mile_sigma


@dataclass
class OptimizerConfig:
    """Adam with warmup and decay, gradient clipping and mixed precision."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: str = flag("linear", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    """Learning-rate decay after warmup."""
    lr_warmup_iters: int = 0
    """Iterations of linear warmup from 0 to --lr."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the learning rate decays. Default: --train-iters."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2 (the paper uses 0.95)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    bf16: bool = False
    """bf16 model and activations with fp32 main weights and gradients in the optimizer."""
    accumulate_allreduce_grads_in_fp32: bool = False
    """Accumulate and all-reduce gradients in fp32: always so here unless --grad-reduce-in-bf16."""
    grad_reduce_in_bf16: bool = False
    """With --bf16: accumulate and reduce gradients in bf16 (half the traffic; sums lose precision)."""

    # Megatron-LM's schedule and optimizer flags (same names, defaults and units). The schedule counts
    # samples, as Megatron-LM's does: iteration flags are multiplied by --global-batch-size.
    optimizer: str = flag("adam", choices=["adam", "sgd"])
    """Optimizer: Adam with decoupled weight decay (AdamW), or SGD with --sgd-momentum."""
    sgd_momentum: float = 0.9
    """SGD momentum (--optimizer sgd)."""
    lr_warmup_fraction: Optional[float] = None
    """Fraction of the decay length (--lr-decay-iters / --lr-decay-samples) to warm up over; replaces
    --lr-warmup-iters / --lr-warmup-samples."""
    lr_warmup_samples: int = 0
    """Samples of linear warmup (with --train-samples)."""
    lr_warmup_init: float = 0.0
    """Learning rate at the start of the warmup."""
    lr_decay_samples: Optional[int] = None
    """Samples over which the learning rate decays (with --train-samples). Default: --train-samples."""
    lr_wsd_decay_style: str = flag("exponential", choices=["exponential", "linear", "cosine", "minus_sqrt"])
    """Shape of the final anneal of --lr-decay-style WSD."""
    lr_wsd_decay_iters: Optional[int] = None
    """--lr-decay-style WSD: iterations of the final anneal; the learning rate stays at --lr before it."""
    lr_wsd_decay_samples: Optional[int] = None
    """--lr-decay-style WSD with --train-samples: samples of the final anneal."""
    start_weight_decay: Optional[float] = None
    """Weight decay at the start of training (with --weight-decay-incr-style). Default: --weight-decay."""
    end_weight_decay: Optional[float] = None
    """Weight decay at the end of training (with --weight-decay-incr-style). Default: --weight-decay."""
    weight_decay_incr_style: str = flag("constant", choices=["constant", "linear", "cosine"])
    """How weight decay moves from --start-weight-decay to --end-weight-decay over training."""
    decoupled_lr: Optional[float] = None
    """A separate peak learning rate for the input embedding and output layer. Default: --lr."""
    decoupled_min_lr: Optional[float] = None
    """The minimum learning rate of the input embedding and output layer with --decoupled-lr."""


@dataclass
class DataConfig:
    """Where samples come from and how text becomes token ids."""

    data_path: Optional[List[str]] = flag(None, nargs="*")
    """Dataset prefixes (without .bin/.idx), optionally weighted: `w1 prefix1 w2 prefix2 ...`."""
    split: str = "969, 30, 1"
    """Train/validation/test proportions of each dataset, comma-separated."""
    mock_data: bool = False
    """Train on megatron-core's synthetic dataset (no files needed; use with --tokenizer-type NullTokenizer)."""
    data_cache_path: Optional[str] = None
    """Where dataset index caches are written. Default: beside the data."""
    num_workers: int = 0
    """Data-loader worker processes (a torch DataLoader reads and collates samples in them); 0 reads in the
    training process."""
    mmap_bin_files: bool = flag(True, action=argparse.BooleanOptionalAction)
    """Memory-map the datasets' .bin files (--no-mmap-bin-files reads them with file reads instead)."""
    tokenizer_type: Optional[str] = flag(
        None,
        choices=["NullTokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer"],
    )
    """Tokenizer type."""
    tokenizer_model: Optional[str] = None
    """tokenizer.json (HuggingFaceTokenizer) or .model file (SentencePieceTokenizer)."""
    vocab_file: Optional[str] = None
    """GPT2BPETokenizer vocabulary (vocab.json)."""
    merge_file: Optional[str] = None
    """GPT2BPETokenizer merges (merges.txt)."""
    vocab_size: Optional[int] = None
    """Vocabulary size for NullTokenizer."""
    eod_mask_loss: bool = False
    """Loss mask 0 where the input token is the end-of-document token (the next document's first token is not
    predictable from the previous one): no loss there and no part in the MiLe / focal weights' sum."""
    reset_position_ids: bool = False
    """Restart the position ids at 0 after each end-of-document token (needs --position-embedding-type
    learned_absolute: megatron-core's rotary embeddings do not read position ids)."""
    reset_attention_mask: bool = False
    """Let tokens attend only to earlier tokens of their own document (block-diagonal causal mask built by
    the data loader; megatron-core's local attention without the fused masked softmax)."""
    create_attention_mask_in_dataloader: bool = flag(True, action=argparse.BooleanOptionalAction)
    """Build each sample's [1, s, s] attention mask in the data loader for the model (Megatron-LM's default);
    --no-create-attention-mask-in-dataloader leaves causal masking to the attention kernel."""


@dataclass
class TrainingConfig:
    """Batch sizes, iteration counts, checkpoints and logging."""

    micro_batch_size: int = 1
    """Samples per micro-batch on each data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all ranks; gradient accumulation = global / (micro * DP).
    Default: micro-batch size * DP."""
    train_iters: Optional[int] = None
    """Optimizer steps to train for (or give --train-samples)."""
    train_samples: Optional[int] = None
    """Samples to train for, instead of --train-iters: the run takes train_samples // global batch size steps
    and the learning-rate flags count samples (--lr-decay-samples, --lr-warmup-samples, ...)."""
    seed: int = 1234
    """Random seed (weights, dropout, data order)."""
    save: Optional[str] = None
    """Directory to save checkpoints to."""
    load: Optional[str] = None
    """Directory to load a checkpoint from (its latest_checkpointed_iteration.txt)."""
    # Loading and saving switches, with Megatron-LM's names and meanings.
    override_opt_param_scheduler: bool = flag(False, aliases=["--override-opt_param-scheduler"])
    """On resume, take the learning-rate and weight-decay schedule (--lr, --min-lr, --lr-warmup-iters, the decay
    length and style, --weight-decay) from the flags where they differ from the checkpoint's; the iteration
    count continues from the checkpoint. Default: refuse a checkpoint whose schedule differs."""
    use_checkpoint_opt_param_scheduler: bool = flag(False, aliases=["--use-checkpoint-opt_param-scheduler"])
    """On resume, keep the checkpoint's learning-rate and weight-decay schedule whatever the flags say."""
    finetune: bool = False
    """Load only the model weights from --load (or --pretrained-checkpoint) and start at iteration 0 with a
    fresh optimizer, scheduler, RNG and data position."""
    no_load_optim: bool = False
    """Do not load the optimizer state and scheduler from the checkpoint."""
    no_load_rng: bool = False
    """Do not load the random-number-generator states from the checkpoint."""
    no_save_optim: bool = False
    """Save checkpoints without the optimizer state (weights, scheduler and counters only)."""
    no_save_rng: bool = False
    """Save checkpoints without the random-number-generator states."""
    use_checkpoint_args: bool = False
    """Take the model-shape flags (layers, hidden size, heads, ...) from the checkpoint in --load."""
    pretrained_checkpoint: Optional[str] = None
    """Checkpoint directory whose weights start the run when --load holds no checkpoint (fine-tuning from a
    pretrained model; the run's own checkpoints in --load win once they exist)."""
    ckpt_step: Optional[int] = None
    """Load this iteration instead of the one latest_checkpointed_iteration.txt names."""
    ckpt_format: str = "torch_dist"
    """Checkpoint format: torch_dist (megatron-core's distributed format) is the one read and written."""
    async_save: bool = False
    """Write checkpoints in the background (torch_dist): every rank copies its shards to CPU memory and a
    thread writes them while training goes on; the checkpoint becomes the latest only after every rank's
    write has finished (megatron_mile.checkpointing.async_save). Saves at exit and at the end wait."""
    auto_detect_ckpt_format: bool = False
    """Detect the format of the checkpoint to load (only torch_dist is read; others are refused by name)."""
    save_interval: Optional[int] = None
    """Save a checkpoint every this many iterations (and at the end of training)."""
    exit_interval: Optional[int] = None
    """Save (if --save) and exit when the iteration number is divisible by this."""
    eval_interval: int = 1000
    """Evaluate on the validation data every this many iterations."""
    eval_iters: int = 100
    """Validation micro-batch rounds per evaluation (each consumes one global batch); 0 disables it."""
    log_interval: int = 100
    """Print a log line every this many iterations."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here."""
    # Megatron-LM's logging flags (same names, defaults and units; docs in README's "Logs").
    tensorboard_log_interval: int = 1
    """Write the per-iteration TensorBoard scalars (losses, learning rate, grad norm, ...) every this many
    iterations; the interval ones (tokens per second, timers) follow --log-interval."""
    tensorboard_queue_size: int = 1000
    """TensorBoard events held in memory before they are written to disk (the SummaryWriter's max_queue)."""
    log_throughput: bool = False
    """Add `throughput per GPU (TFLOP/s/GPU)` to the log line: the model's floating-point operations per step
    (Megatron-LM's count: 3 x the matrix multiplications, recomputation not counted) over the interval's
    time per iteration and the world size."""
    log_params_norm: bool = False
    """Add the L2 norm of all parameters (over every rank; fp32 main weights under --bf16) to the log line and
    TensorBoard (`train/params norm`), after the logged iteration's update."""
    log_num_zeros_in_grad: bool = False
    """Add the number of gradient entries equal to zero (over all ranks; a tensor-parallel shard counts,
    a replica does not) to the log line and TensorBoard (`train/num zeros`)."""
    timing_log_level: int = flag(0, choices=[0, 1, 2])
    """Timers measured and reported every --log-interval (ms per iteration, min and max over ranks):
    0 the iteration time only; 1 also those run about once per step (forward-backward, all-grads-sync,
    optimizer and its stages); 2 also those run once per micro-batch (batch-generator, forward-compute,
    backward-compute, pipeline send/recv). Levels 1 and 2 synchronise ranks and slow training a little."""
    log_timers_to_tensorboard: bool = False
    """Write to TensorBoard every --log-interval the timers of --timing-log-level (`<name>-time`, seconds per
    iteration, max over ranks), `train/iteration time` (seconds) and, with --log-throughput,
    `train/throughput` (TFLOP/s per GPU)."""
    log_validation_ppl_to_tensorboard: bool = False
    """Also write the validation perplexity exp(lm loss) to TensorBoard (`validation/lm loss PPL`)."""
    log_memory_to_tensorboard: bool = False
    """Write memory use to TensorBoard: on GPUs torch.cuda's allocator statistics (`mem-reserved-bytes`,
    `mem-allocated-bytes`, `mem-max-allocated-bytes`, `mem-allocated-count`), on CPU the process's resident
    set size (`mem-rss-bytes`)."""
    wandb_project: Optional[str] = None
    """Weights & Biases project to log the run's scalars to. Default: no W&B logging."""
    wandb_exp_name: Optional[str] = None
    """Weights & Biases run (experiment) name."""
    wandb_entity: Optional[str] = None
    """Weights & Biases entity (user or team) that owns the project."""
    wandb_save_dir: Optional[str] = None
    """Local directory for the Weights & Biases files."""
    log_entropy_histogram_interval: Optional[int] = None
    """Every this many iterations, write to TensorBoard the distributions (histograms) of the per-token
    entropy and loss weight over the step's loss-masked tokens, to see how token difficulty moves through
    training. Default: every --eval-interval iterations when --tensorboard-dir is set; 0 turns it off (then
    the step does no extra work)."""
    no_progress: bool = False
    """Do not print the console progress line with ETA."""
    max_skipped_iterations: int = 10
    """Stop when this many consecutive iterations had a non-finite loss (their updates are skipped)."""
    # Megatron-LM's run-control flags (same names, defaults and units).
    distributed_timeout_minutes: int = 10
    """Timeout of the process group's collectives, in minutes."""
    exit_duration_in_mins: Optional[float] = None
    """Save (if --save) and exit 0 when the next step would end more than this many minutes after the run
    started (set-up included; checked after each iteration, agreed over all ranks). Leave room for the
    final save. Megatron-LM takes whole minutes; fractions are accepted here."""
    exit_signal_handler: bool = False
    """On --exit-signal (default SIGTERM, which Slurm sends before it kills a job) every rank finishes the
    current step, the run saves a checkpoint (with --save) and exits 0."""
    exit_signal: Optional[str] = flag(None, choices=list(EXIT_SIGNALS))
    """The signal --exit-signal-handler catches. Default: SIGTERM."""
    manual_gc: bool = False
    """Disable Python's automatic garbage collector during training (avoids collections at different times
    on different ranks); collect every --manual-gc-interval iterations instead."""
    manual_gc_interval: int = 0
    """With --manual-gc: run a garbage collection every this many iterations; 0 only at the start."""
    empty_unused_memory_level: int = flag(0, choices=[0, 1, 2])
    """Release the GPU memory cached by torch after each step (1) and also after each evaluation (2); CPU
    runs hold no such cache."""
    logging_level: Optional[int] = None
    """Python logging level of the run (10 debug, 20 info, 30 warning, ...). Default: unchanged."""


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

    transformer_impl: str = flag("local", choices=["local", "transformer_engine"])
    """Transformer layers: megatron-core's local modules (CPU and GPU), or Transformer Engine's (GPU; fused
    norm + linear, fused attention; needed for FP8 and for --sequence-parallel with RMSNorm)."""
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
