"""Checks of a run's flags at start-up: ranges of numeric flags, schedule and checkpoint flag combinations,
and `config_problems`, the whole RunConfig check behind RunConfig.validate (every problem, each with its fix).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, List, Optional, Sequence

from megatron_mile import kernels, option_checks
from megatron_mile.data.blends import source_flag_problems
from megatron_mile.data.splits import data_flag_problems
from megatron_mile.data.tokenizers import SENTENCEPIECE_TYPES
from megatron_mile.loss.spec import WEIGHTINGS

if TYPE_CHECKING:  # annotations only: run_config imports this module
    from megatron_mile.config.run_config import RunConfig
    from megatron_mile.config.sections import OptimizerConfig
    from megatron_mile.config.training import TrainingConfig


class ConfigError(ValueError):
    """Invalid flags or flag combinations; the message lists every problem and how to fix it."""


# The range of every numeric flag, checked at start-up (RunConfig.validate) so that a bad value stops the run
# before any work instead of crashing later (a zero interval dividing, a negative size reaching torch).
# Unset optional flags (None) are not checked. Every float flag must also be finite.
_AT_LEAST_ONE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "seq_length",
    "kv_channels",
    "max_position_embeddings", "rotary_base", "make_vocab_size_divisible_by", "micro_batch_size",
    "global_batch_size", "train_iters", "train_samples", "lr_decay_iters", "lr_decay_samples", "exit_interval",
    "log_interval", "eval_interval", "max_skipped_iterations", "distributed_timeout_minutes", "recompute_num_layers",
    "ddp_bucket_size", "context_parallel_size", "tensorboard_log_interval", "tensorboard_queue_size",
    "hysteresis",
)
_AT_LEAST_ZERO = ("exit_duration_in_mins", "manual_gc_interval", "lr", "min_lr", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init", "weight_decay",
                  "start_weight_decay", "end_weight_decay", "decoupled_lr", "decoupled_min_lr", "sgd_momentum",
                  "clip_grad", "eval_iters", "num_workers", "seed", "label_smoothing", "z_loss_coeff")
_POSITIVE = ("norm_epsilon", "init_method_std", "adam_eps", "rotary_seq_len_interpolation_factor",
             "rope_scaling_factor", "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window")


def _range_problems(config: "RunConfig") -> List[str]:
    """One message per numeric flag outside its range (or not finite), naming the flag and the value."""
    problems = []
    for section_name in config.SECTIONS:
        section = getattr(config, section_name)
        for f in fields(section):
            value = getattr(section, f.name)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = "--" + f.name.replace("_", "-")
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value}")
            elif f.name in _AT_LEAST_ONE and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
            elif f.name in _AT_LEAST_ZERO and value < 0:
                problems.append(f"{name} must be >= 0, got {value}")
            elif f.name in _POSITIVE and value <= 0:
                problems.append(f"{name} must be > 0, got {value}")
    return problems


def schedule_problems(config: "RunConfig") -> List[str]:
    """The learning-rate and weight-decay schedule flags' combinations, as Megatron-LM checks them: iteration
    flags with --train-iters, sample flags with --train-samples, one way to give the warmup, WSD's anneal."""
    o, t = config.optimizer, config.training
    problems = []
    if t.train_iters is None and t.train_samples is None:
        problems.append("the run length is required: give --train-iters (steps) or --train-samples")
        return problems
    by_samples = t.train_samples is not None
    unit, other = ("samples", "iters") if by_samples else ("iters", "samples")
    for name in ("lr_decay", "lr_wsd_decay", "lr_warmup"):
        value = getattr(o, f"{name}_{other}")
        if value not in (None, 0):
            problems.append(f"--{name.replace('_', '-')}-{other} needs --train-{other}: with --train-{unit} "
                            f"give --{name.replace('_', '-')}-{unit}")
    warmup = o.lr_warmup_samples if by_samples else o.lr_warmup_iters
    if o.lr_warmup_fraction is not None:
        if warmup:
            problems.append(f"give one of --lr-warmup-fraction or --lr-warmup-{unit}, not both")
        if not 0 <= o.lr_warmup_fraction <= 1:
            problems.append(f"--lr-warmup-fraction must lie in [0, 1], got {o.lr_warmup_fraction}")
    decay = o.lr_decay_samples or t.train_samples if by_samples else o.lr_decay_iters or t.train_iters
    if o.lr_warmup_fraction is None and warmup >= decay:
        problems.append(f"--lr-warmup-{unit} {warmup} must be smaller than the decay length {decay} "
                        f"(--lr-decay-{unit}, default --train-{unit}): lower --lr-warmup-{unit} or train longer")
    wsd = o.lr_wsd_decay_samples if by_samples else o.lr_wsd_decay_iters
    if o.lr_decay_style == "WSD":
        if wsd is None:
            problems.append(f"--lr-decay-style WSD needs --lr-wsd-decay-{unit} (the length of the final anneal)")
        elif not 0 < wsd <= decay:
            problems.append(f"--lr-wsd-decay-{unit} {wsd} must lie in (0, {decay}] (the decay length)")
    if o.weight_decay_incr_style == "constant" and o.start_weight_decay != o.end_weight_decay:
        problems.append("--start-weight-decay and --end-weight-decay differ: give --weight-decay-incr-style "
                        "linear or cosine (or drop them for a constant --weight-decay)")
    if o.decoupled_min_lr is not None and o.decoupled_lr is None:
        problems.append("--decoupled-min-lr needs --decoupled-lr")
    return problems


def rampup_problems(t: "TrainingConfig", data_parallel_size: int = 0) -> List[str]:
    """--rampup-batch-size START INCREMENT SAMPLES as megatron-core's ramp calculator needs it: with
    --train-samples (as Megatron-LM), START below --global-batch-size, the difference a multiple of INCREMENT,
    and (when the DP size is known) every batch of the ramp a whole number of micro-batches on each rank."""
    if not t.rampup_batch_size:
        return []
    start, increment, samples = t.rampup_batch_size
    problems = []
    if t.train_samples is None:
        problems.append("--rampup-batch-size needs --train-samples (as in Megatron-LM, only a run counted in "
                        "samples ramps its batch size)")
    if start < 1 or increment < 1 or samples < 1:
        # Ramp samples of 0: megatron-core divides by the samples per increment (a ZeroDivisionError).
        return problems + [f"--rampup-batch-size {start} {increment} {samples}: the start batch, the increment "
                           "and the ramp samples must be >= 1"]
    gbs = t.global_batch_size
    if gbs is not None and (start >= gbs or (gbs - start) % increment):
        problems.append(f"--rampup-batch-size {start} {increment} {samples}: the start batch must be smaller than "
                        f"--global-batch-size {gbs} and their difference a multiple of the increment")
    step = t.micro_batch_size * data_parallel_size
    if step >= 1 and (start % step or increment % step):
        problems.append(f"--rampup-batch-size {start} {increment} {samples}: the start batch and the increment "
                        f"must be multiples of --micro-batch-size * DP = {step} (every batch of the ramp is whole "
                        "micro-batches on each rank)")
    return problems


def checkpoint_flag_problems(t: "TrainingConfig") -> List[str]:
    """The checkpoint loading/saving flags' conflicts, each with its fix."""
    problems = []
    if t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler:
        problems.append("give at most one of --override-opt_param-scheduler (the flags' schedule) and "
                        "--use-checkpoint-opt_param-scheduler (the checkpoint's)")
    if t.ckpt_format != "torch_dist":
        problems.append(f"--ckpt-format {t.ckpt_format}: only torch_dist checkpoints are read and written; convert "
                        "others with Megatron-LM's tools/checkpoint/convert.py (--saver core, torch_dist)")
    if t.ckpt_step is not None and t.ckpt_step < 0:
        problems.append(f"--ckpt-step must be >= 0, got {t.ckpt_step}")
    return problems


# Weights & Biases flags: they need the optional wandb package (imported only by a run that logs to W&B).
WANDB_FLAGS = ("wandb_project", "wandb_exp_name", "wandb_entity", "wandb_save_dir")
# Flags that only choose what goes to TensorBoard: without --tensorboard-dir they would do nothing.
_TENSORBOARD_ONLY = ("log_timers_to_tensorboard", "log_validation_ppl_to_tensorboard", "log_memory_to_tensorboard")


# The dynamic loss scaler's flags, with their defaults: only --fp16 without --loss-scale reads them.
_DYNAMIC_LOSS_SCALE_DEFAULTS = {"initial_loss_scale": 2.0 ** 32, "min_loss_scale": 1.0, "loss_scale_window": 1000,
                                "hysteresis": 2}


def loss_scaling_problems(o: "OptimizerConfig") -> List[str]:
    """--fp16 and --bf16 exclude each other; a loss-scaling flag that nothing would read is refused.

    As megatron-core's get_megatron_optimizer: --loss-scale (a ConstantGradScaler) scales the loss under
    --fp16 or --bf16 (fp32 training has no loss scale); the dynamic scaler's flags only act with --fp16
    and no --loss-scale."""
    problems = []
    if o.fp16 and o.bf16:
        problems.append("give one of --fp16 and --bf16, not both")
    if o.loss_scale is not None and not o.half_precision:
        problems.append("--loss-scale needs --fp16 (or --bf16): fp32 training does not scale the loss")
    dynamic = o.fp16 and o.loss_scale is None
    changed = [name for name, default in _DYNAMIC_LOSS_SCALE_DEFAULTS.items() if getattr(o, name) != default]
    if changed and not dynamic:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        problems.append(f"{flags}: dynamic loss scaling only (--fp16 without --loss-scale); drop "
                        f"{'them' if len(changed) > 1 else 'it'} or train with --fp16")
    if dynamic and o.min_loss_scale > o.initial_loss_scale:
        problems.append(f"--min-loss-scale {o.min_loss_scale} exceeds --initial-loss-scale {o.initial_loss_scale}")
    return problems


def wandb_available() -> bool:
    """Whether the wandb package can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec("wandb") is not None
    except ValueError:  # a module put in sys.modules by hand, without a spec
        return "wandb" in sys.modules


def logging_flag_problems(t: "TrainingConfig") -> List[str]:
    """The logging flags' conflicts: TensorBoard content without --tensorboard-dir, W&B without wandb."""
    problems = []
    if t.log_entropy_histogram_interval is not None:
        if t.log_entropy_histogram_interval < 0:
            problems.append("--log-entropy-histogram-interval must be >= 0 (0 = off)")
        elif t.log_entropy_histogram_interval and t.tensorboard_dir is None:
            problems.append("--log-entropy-histogram-interval writes TensorBoard histograms: add --tensorboard-dir <dir>")
    for name in _TENSORBOARD_ONLY:
        if getattr(t, name) and t.tensorboard_dir is None:
            problems.append(f"--{name.replace('_', '-')} writes to TensorBoard: add --tensorboard-dir <dir>")
    wandb_flags = [name for name in WANDB_FLAGS if getattr(t, name)]
    if wandb_flags and not wandb_available():
        flag = "--" + wandb_flags[0].replace("_", "-")
        problems.append(f"{flag} needs the wandb package: pip install wandb (then runs log offline with "
                        "WANDB_MODE=offline)")
    elif wandb_flags and not t.wandb_project:
        problems.append("--wandb-exp-name, --wandb-entity and --wandb-save-dir need --wandb-project")
    return problems


def profiling_flag_problems(t: "TrainingConfig", world_size: int, gpu_available: bool) -> List[str]:
    """The profiling flags' conflicts: an empty step range, ranks that do not exist, the nsys mode without a
    GPU, the torch.profiler trace without a directory to write it to."""
    if not t.profile:
        if t.use_pytorch_profiler:
            return ["--use-pytorch-profiler only acts with --profile: add --profile (or drop it)"]
        return []
    problems = []
    if not 0 <= t.profile_step_start < t.profile_step_end:
        problems.append(f"--profile-step-start {t.profile_step_start} and --profile-step-end {t.profile_step_end}: "
                        "need 0 <= start < end (the steps profiled are start .. end - 1)")
    missing = sorted(rank for rank in set(t.profile_ranks) if not 0 <= rank < world_size)
    if missing:
        problems.append(f"--profile-ranks {' '.join(map(str, missing))}: no such rank in a world of {world_size}; "
                        f"give ranks in 0 .. {world_size - 1}")
    if not t.use_pytorch_profiler and not gpu_available:
        problems.append("--profile without --use-pytorch-profiler starts and stops nsys's capture "
                        "(cudaProfilerStart/Stop) and needs a CUDA GPU; on CPU add --use-pytorch-profiler "
                        "(a torch.profiler trace in --tensorboard-dir)")
    if t.use_pytorch_profiler and t.tensorboard_dir is None:
        problems.append("--use-pytorch-profiler writes its trace into --tensorboard-dir: add --tensorboard-dir <dir>")
    return problems


def _rope_problems(m) -> List[str]:
    """The rope modifiers act only on rope, and --rope-scaling-factor only with --use-rope-scaling."""
    problems = []
    if m.position_embedding_type != "rope":
        for name in ("rotary_seq_len_interpolation_factor", "use_rope_scaling"):
            if getattr(m, name):
                problems.append(f"--{name.replace('_', '-')} modifies rotary position embeddings: add "
                                "--position-embedding-type rope (or drop it)")
    if m.rope_scaling_factor is not None and not m.use_rope_scaling:
        problems.append("--rope-scaling-factor needs --use-rope-scaling")
    return problems


def _selection_problems(config: "RunConfig") -> List[str]:
    """--selection-fraction only with a selection loss type, in (0, 1]; and not with the fused LM head."""
    l = config.loss
    weighting = WEIGHTINGS.get(l.loss_type)
    if weighting is None:  # argparse's choices already refused it
        return []
    problems = []
    if "selection_fraction" not in weighting.parameters:
        if l.selection_fraction is not None:
            selections = " or ".join(n for n, w in WEIGHTINGS.items() if "selection_fraction" in w.parameters)
            problems.append(f"--selection-fraction needs --loss-type {selections}")
    elif l.selection_fraction is not None and not 0 < l.selection_fraction <= 1:
        problems.append(f"--selection-fraction is the share of tokens kept and must lie in (0, 1], got "
                        f"{l.selection_fraction}")
    if weighting.needs_token_scope and config.kernels.fused_lm_head:
        problems.append(f"--fused-lm-head cannot train --loss-type {l.loss_type}: it forms each chunk's gradient "
                        "before the micro-batch's selection threshold is known; drop --fused-lm-head")
    return problems


def config_problems(config: "RunConfig", world_size: int, gpu_available: bool,
                    kernel_support: Optional[kernels.KernelSupport] = None,
                    extra_problems: Sequence[str] = ()) -> List[str]:
    """Every invalid setting or combination of `config` (finalized) for `world_size` ranks, each with its
    fix; RunConfig.validate documents the arguments."""
    problems: List[str] = list(extra_problems)
    m, p, l, o, d, t = config.model, config.parallel, config.loss, config.optimizer, config.data, config.training
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    sizes_valid = tp >= 1 and pp >= 1 and cp >= 1

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    problems.extend(_range_problems(config))
    need(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if sizes_valid:
        names, sizes = ("TP * PP", f"{tp} * {pp}") if cp == 1 else ("TP * PP * CP", f"{tp} * {pp} * {cp}")
        need(
            world_size % config.model_parallel_size() == 0,
            f"world size {world_size} is not divisible by {names} = {sizes}: launch a multiple of "
            f"{config.model_parallel_size()} processes (torchrun --nproc_per_node) or change the parallel sizes",
        )
        need(
            m.num_attention_heads % tp == 0,
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {m.num_attention_heads}",
        )
        need(
            m.num_query_groups % tp == 0,
            f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {m.num_query_groups}",
        )
        need(
            m.num_layers % pp == 0,
            f"--pipeline-model-parallel-size {pp} does not divide --num-layers {m.num_layers}",
        )
    need(
        m.hidden_size % max(m.num_attention_heads, 1) == 0,
        f"--num-attention-heads {m.num_attention_heads} does not divide --hidden-size {m.hidden_size}",
    )
    need(
        m.num_attention_heads % max(m.num_query_groups, 1) == 0,
        f"--num-query-groups {m.num_query_groups} does not divide --num-attention-heads {m.num_attention_heads}",
    )
    # As Megatron-LM: also with rope, whose tables (and an exported model's advertised context) are sized
    # by --max-position-embeddings.
    need(0 < m.rotary_percent <= 1, f"--rotary-percent must lie in (0, 1], got {m.rotary_percent}")
    problems.extend(_rope_problems(m))
    need(not m.use_flash_attn or m.attention_backend == "flash",
         f"--use-flash-attn asks for --attention-backend flash, but --attention-backend {m.attention_backend} is "
         "given: keep one of them")
    if not gpu_available:
        if m.use_flash_attn:
            need(False, "--use-flash-attn (--attention-backend flash) needs a CUDA GPU with Transformer Engine; "
                 "on CPU drop it (megatron-core's local attention is used)")
        else:
            need(m.attention_backend in ("auto", "local", "unfused"),
                 f"--attention-backend {m.attention_backend} needs a CUDA GPU with Transformer Engine; on CPU "
                 "use --attention-backend auto (or local)")
        need(not m.apply_layernorm_1p, "--apply-layernorm-1p needs a CUDA GPU (Transformer Engine's or apex's "
             "fused norms); on CPU drop it")
    need(
        m.max_position_embeddings >= m.seq_length,
        f"--max-position-embeddings {m.max_position_embeddings} must be >= --seq-length {m.seq_length}: "
        "raise it (or leave it unset: it defaults to --seq-length)",
    )
    if p.num_layers_per_virtual_pipeline_stage is not None:
        v = p.num_layers_per_virtual_pipeline_stage
        need(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        need(
            v >= 1 and pp >= 1 and m.num_layers % (pp * v) == 0,
            f"--num-layers {m.num_layers} must be divisible by PP * --num-layers-per-virtual-pipeline-stage "
            f"= {pp} * {v}",
        )
    dp = config.data_parallel_size(world_size) if sizes_valid else 0
    problems += rampup_problems(t, dp)
    if dp >= 1 and t.micro_batch_size >= 1:
        need(
            t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size * DP = "
            f"{t.micro_batch_size} * {dp}",
        )

    # Loss flags only make sense with their loss type.
    if l.loss_type != "mile":
        for name in ("mile_gamma", "mile_sigma", "mile_entropy_threshold"):
            need(getattr(l, name) is None, f"--{name.replace('_', '-')} needs --loss-type mile")
    if l.loss_type != "focal":
        need(l.focal_gamma is None, "--focal-gamma needs --loss-type focal")
    need(math.isfinite(l.gamma) and l.gamma >= 0, f"the loss gamma must be >= 0, got {l.gamma}")
    need(math.isfinite(l.sigma) and l.sigma > 0, f"--mile-sigma must be > 0, got {l.sigma}")
    if l.mile_entropy_threshold is not None:
        need(0 <= l.mile_entropy_threshold <= 1, "--mile-entropy-threshold must lie in [0, 1]")
    need(l.label_smoothing < 1, f"--label-smoothing must lie in [0, 1), got {l.label_smoothing}")
    problems.extend(_selection_problems(config))

    need(o.min_lr <= o.lr, f"--min-lr {o.min_lr} exceeds --lr {o.lr}")
    problems += loss_scaling_problems(o)
    need(not o.grad_reduce_in_bf16 or o.bf16, "--grad-reduce-in-bf16 needs --bf16 (fp32 parameters have fp32 "
         "gradients)")
    need(not (o.grad_reduce_in_bf16 and o.accumulate_allreduce_grads_in_fp32),
         "give one of --grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32")
    need(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "--adam-beta1/2 must lie in [0, 1)")
    need(0 <= m.hidden_dropout < 1 and 0 <= m.attention_dropout < 1, "dropout probabilities must lie in [0, 1)")
    problems.extend(schedule_problems(config))
    problems.extend(logging_flag_problems(t))
    problems.extend(profiling_flag_problems(t, world_size, gpu_available))

    # Data.
    problems.extend(source_flag_problems(d, t.eval_iters))  # the blends, from flags or files
    if d.split is not None:
        problems.extend(data_flag_problems(None, d.split, t.eval_iters))
    need(d.dataloader_type != "external", "--dataloader-type external hands Megatron-LM the dataset as the user's "
         "own data loader; this trainer has no hook for one: use single or cyclic")
    need(d.num_dataset_builder_threads >= 1,
         f"--num-dataset-builder-threads must be >= 1, got {d.num_dataset_builder_threads}")
    need(d.tokenizer_type is not None, "--tokenizer-type is required (NullTokenizer with --vocab-size for --mock-data)")
    if d.tokenizer_type == "NullTokenizer":
        need(d.vocab_size is not None and d.vocab_size >= 2, "NullTokenizer needs --vocab-size >= 2")
    if d.tokenizer_type in ("HuggingFaceTokenizer", "TikTokenizer") + SENTENCEPIECE_TYPES:
        need(d.tokenizer_model is not None, f"{d.tokenizer_type} needs --tokenizer-model")
    if d.tokenizer_type == "TikTokenizer":
        need(d.tiktoken_pattern is not None, "TikTokenizer needs --tiktoken-pattern (v1 or v2)")
        need(kernels.module_available("tiktoken"), "--tokenizer-type TikTokenizer needs the tiktoken package, which is "
             "not installed: pip install tiktoken")
    if d.tokenizer_type == "GPT2BPETokenizer":
        need(d.vocab_file is not None and d.merge_file is not None, "GPT2BPETokenizer needs --vocab-file and --merge-file")

    problems.extend(checkpoint_flag_problems(t))
    need(t.exit_signal is None or t.exit_signal_handler,
         f"--exit-signal {t.exit_signal} needs --exit-signal-handler (without it no signal is caught)")
    need(not t.async_save or t.save is not None, "--async-save needs --save <dir>")
    if t.save_interval is not None:
        need(t.save is not None, "--save-interval needs --save <dir>")
        need(t.save_interval >= 1, f"--save-interval must be >= 1, got {t.save_interval}")

    # GPU-only features: the backend here; layer implementation, FP8, fusions and sequence parallelism
    # in megatron_mile.kernels.
    if not gpu_available:
        need(p.distributed_backend != "nccl", "--distributed-backend nccl needs CUDA GPUs; use gloo on CPU")
    if kernel_support is None:
        kernel_support = kernels.detect_kernel_support(gpu_available)
    problems.extend(kernels.config_problems(config, gpu_available, kernel_support))
    # Recomputation, overlapped gradient reduction / parameter gathering, document masking.
    problems.extend(option_checks.config_problems(config))
    return problems
