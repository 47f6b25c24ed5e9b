"""The training-loop section of a run's configuration: batch sizes, iteration counts, checkpoint saving and
loading, run control (exit signals and budgets) and logging; one field per Megatron-LM flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_mile.config.fields import flag

# The signals --exit-signal accepts (Megatron-LM's choices); SIGKILL cannot be caught, so it is no choice.
EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


@dataclass
class TrainingConfig:
    """Batch sizes, iteration counts, checkpoints and logging."""

    micro_batch_size: Optional[int] = None
    """Samples per micro-batch on each data-parallel rank. Required."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all ranks; gradient accumulation = global / (micro * DP).
    Default: micro-batch size * DP."""
    rampup_batch_size: Optional[List[int]] = flag(None, nargs=3, metavar=("START", "INCREMENT", "SAMPLES"))
    """Batch-size ramp-up (needs --train-samples): the global batch starts at START and grows by INCREMENT
    in equal shares of the first SAMPLES samples until it reaches --global-batch-size (megatron-core's
    num-microbatches calculator; e.g. `16 16 5859375` with --global-batch-size 1536)."""
    train_iters: Optional[int] = None
    """Optimizer steps to train for (or give --train-samples: one of them is required)."""
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
    """Add the L2 norm of all parameters (over every rank; fp32 main weights under --bf16 / --fp16) to the log line and
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
    # Megatron-LM's profiling flags (megatron_mile.training.profiling; same names, defaults and units).
    profile: bool = False
    """Profile the steps --profile-step-start to --profile-step-end on the ranks of --profile-ranks: with
    --use-pytorch-profiler a torch.profiler trace of steps [start, end) into --tensorboard-dir; without it
    (GPU) cudaProfilerStart/Stop around steps start+1 to end for an `nsys profile
    --capture-range=cudaProfilerApi` launch, with NVTX ranges per operator."""
    profile_step_start: int = 10
    """Iteration (the number the log prints) at which profiling starts."""
    profile_step_end: int = 12
    """Iteration at which profiling ends (the torch.profiler trace covers the steps before it)."""
    use_pytorch_profiler: bool = False
    """With --profile: record with torch.profiler (CPU and GPU; operator shapes and Python stacks) and write
    the trace as `<--tensorboard-dir>/rank<N>.<time>.pt.trace.json` (TensorBoard's profiler plugin, Perfetto
    or chrome://tracing read it)."""
    profile_ranks: List[int] = flag([0], nargs="+")
    """Global ranks to profile."""
