"""Wrapping model chunks for training (bf16 / fp16, megatron DDP), building the optimizer and LR schedule, and the
distributed optimizer's state fix-ups around a checkpoint load."""

from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_mile.config import RunConfig


def ddp_config(config: RunConfig) -> DistributedDataParallelConfig:
    """megatron's DistributedDataParallelConfig for this run, as Megatron-LM builds it from the same flags.

    Gradients are kept and reduced in fp32 (in bf16 with --bf16 --grad-reduce-in-bf16) and SUMMED over the
    data-parallel (and context-parallel) ranks: the model's TransformerConfig sets calculate_per_token_loss,
    so DDP scales nothing, and finalize_model_grads divides the reduced sums once by the global weight sum
    W. With --overlap-grad-reduce a bucket's reduction starts during the last micro-batch's backward, before W is
    known; a sum needs no W, and the division runs after finish_grad_sync has waited for every bucket, so
    the result is the exact gradient of L = sum(w * ce) / sum(w) (docs/scale.md). Needs megatron's
    parallel state (the default bucket size grows with the DP size).
    """
    from megatron.core import parallel_state

    p = config.parallel
    bucket_size = None  # one bucket per buffer: the reduction waits for the end of backward anyway
    if p.overlap_grad_reduce:
        dp_cp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        # megatron's default: large enough that each rank's share of a bucket stays bandwidth-bound.
        bucket_size = p.ddp_bucket_size or max(40_000_000, 1_000_000 * dp_cp)
    return DistributedDataParallelConfig(
        # As Megatron-LM: under --bf16 gradients accumulate and reduce in fp32 unless --grad-reduce-in-bf16
        # (then in the parameters' bf16); fp32 parameters have fp32 gradients either way.
        grad_reduce_in_fp32=not config.optimizer.grad_reduce_in_bf16,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        # As Megatron-LM: only the interleaved schedule launches aligned parameter all-gathers.
        align_param_gather=p.align_param_gather and p.num_layers_per_virtual_pipeline_stage is not None,
        use_distributed_optimizer=p.use_distributed_optimizer,
        bucket_size=bucket_size,
        average_in_collective=False,  # per-token-loss mode sums (option_checks refuses the flag)
        fp8_param_gather=config.kernels.fp8_param_gather,
        check_for_nan_in_grad=False,  # the training step checks the loss itself and skips the update
    )


def wrap_for_training(config: RunConfig, chunks: list) -> list:
    """bf16 and fp16 chunks go into Float16Module; every chunk into megatron's DistributedDataParallel (ddp_config).

    DDP owns the contiguous gradient buffers that the optimizer (and the distributed optimizer's
    reduce-scatter) works on. Collectives: DDP's parameter broadcast over the data-parallel group.
    """
    tf_config = chunks[0].config
    if config.optimizer.half_precision:
        chunks = [Float16Module(tf_config, chunk) for chunk in chunks]
    settings = ddp_config(config)
    return [
        DistributedDataParallel(
            config=tf_config,
            ddp_config=settings,
            module=chunk,
            # Only the first chunk's buffer is bucketed: as Megatron-LM does for virtual pipelines.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]


def build_optimizer(config: RunConfig, model: List, timers=None) -> Tuple[object, OptimizerParamScheduler]:
    """megatron's Adam or SGD (distributed if asked) and the warmup + decay schedule, stepped once per
    applied update by the global batch size (the schedule counts samples, as Megatron-LM's does).
    `timers` (megatron.core.timers.Timers) times the optimizer's stages (megatron_mile.training.timing).

    Weight decay is not applied to biases and norm weights (megatron's default parameter groups); with
    --decoupled-lr the embedding and output layer get their own peak and minimum learning rates.
    """
    o = config.optimizer
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer=o.optimizer,
            lr=o.lr,
            min_lr=o.min_lr,
            decoupled_lr=o.decoupled_lr,
            decoupled_min_lr=o.decoupled_min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            sgd_momentum=o.sgd_momentum,
            clip_grad=o.clip_grad,
            bf16=o.bf16,
            # --fp16: megatron's mixed-precision optimizer with a ConstantGradScaler (--loss-scale) or a
            # DynamicGradScaler (growth x2 every --loss-scale-window clean steps, backoff x0.5 after
            # --hysteresis overflows), as Megatron-LM configures it from the same flags.
            fp16=o.fp16,
            loss_scale=o.loss_scale,
            initial_loss_scale=o.initial_loss_scale,
            min_loss_scale=o.min_loss_scale,
            loss_scale_window=o.loss_scale_window,
            hysteresis=o.hysteresis,
            params_dtype=model[0].config.params_dtype,
            use_distributed_optimizer=config.parallel.use_distributed_optimizer,
            overlap_param_gather=config.parallel.overlap_param_gather,  # mirrors DDP's, as megatron asks
            log_num_zeros_in_grad=config.training.log_num_zeros_in_grad,
            timers=timers,
        ),
        model,
    )
    use_fused_torch_adam_on_cpu(optimizer)
    scheduler = OptimizerParamScheduler(optimizer, **scheduler_settings(config))
    return optimizer, scheduler


def scheduler_settings(config: RunConfig) -> dict:
    """megatron-core OptimizerParamScheduler's arguments for this run, as Megatron-LM derives them.

    Every length is in samples: with --train-iters the iteration flags are multiplied by the global batch
    size, with --train-samples the sample flags are taken as they are; --lr-warmup-fraction is a fraction
    of the decay length; WSD keeps --lr until the last --lr-wsd-decay-iters/-samples of the decay, then
    anneals in --lr-wsd-decay-style. No collectives.
    """
    o, t = config.optimizer, config.training
    if t.train_samples is None:
        batch = t.global_batch_size
        decay = (o.lr_decay_iters or t.train_iters) * batch
        warmup = o.lr_warmup_iters * batch
        wd_incr = t.train_iters * batch
        wsd = None if o.lr_wsd_decay_iters is None else o.lr_wsd_decay_iters * batch
    else:
        decay = o.lr_decay_samples or t.train_samples
        warmup = o.lr_warmup_samples
        wd_incr = t.train_samples
        wsd = o.lr_wsd_decay_samples
    if o.lr_warmup_fraction is not None:
        warmup = o.lr_warmup_fraction * decay
    return dict(
        init_lr=o.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=o.lr_decay_style, start_wd=o.start_weight_decay, end_wd=o.end_weight_decay,
        wd_incr_steps=wd_incr, wd_incr_style=o.weight_decay_incr_style,
        wsd_decay_steps=wsd if o.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style=o.lr_wsd_decay_style if o.lr_decay_style == "WSD" else None,
    )
def finish_parameter_gather(model: List) -> None:
    """Bring every rank's weights up to date now when --overlap-param-gather defers the distributed
    optimizer's all-gather to the next forward (before a checkpoint is written, at the end of training).

    A no-op without it. Collectives: the all-gather of every parameter bucket over the data-parallel group.
    """
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


class UpdateResult(NamedTuple):
    """What step_unless_non_finite did: applied the update or not, the gradient norm, and why not."""

    applied: bool
    grad_norm: Optional[float]  # the global norm before clipping; None when not computed (fp16 overflow)
    skipped_because: Optional[str]  # None when applied
    num_zeros_in_grad: Optional[int] = None  # with --log-num-zeros-in-grad, when the update was applied
    # The loss scaler (--fp16) found inf/NaN in the scaled gradients: an expected event of loss scaling (the
    # dynamic scale is too large), not a divergence; the scaler has already lowered the scale if due.
    overflowed: bool = False


def step_unless_non_finite(optimizer) -> UpdateResult:
    """megatron's optimizer step, except that an update whose gradient norm is NaN/Inf is not applied.

    megatron-core's step applies a finite-loss step whose gradients hold NaN/Inf (e.g. an overflowing
    forward with a finite loss): every weight becomes NaN. This runs the same stages as its step
    (prepare_grads -> the global grad norm -> clipping -> step_with_ready_grads) and stops after the norm
    when it is not finite. The norm is the one clipping needs anyway (one all-reduce over the gradient
    statistics group), so a run with --clip-grad > 0 pays nothing extra; with --clip-grad 0 it costs that
    all-reduce and one pass over the gradients. The caller zeroes the gradients before the next step.

    With --log-num-zeros-in-grad (the optimizer config's log_num_zeros_in_grad) it also counts the
    gradient entries equal to zero, as megatron's step does: over the main gradients the optimizer
    updates, one all-reduce over the same group (the whole world with the distributed optimizer).

    Under --fp16 megatron's prepare_grads unscales the gradients by the loss scale, checks them for inf/NaN
    (over the model-parallel group) and updates the grad scaler; an overflowing step is not applied
    (UpdateResult.overflowed), as in Megatron-LM.

    Collectives: those of megatron's prepare_grads (the grad scaler's found-inf all-reduce) and
    get_grad_norm (all-reduce of the squared norm over the model-parallel gradient-statistics group).
    Every rank reaches the same decision because the norm is global.
    """
    if optimizer.prepare_grads():
        return UpdateResult(False, None, "the gradients overflowed (loss scaling found inf/NaN)", overflowed=True)
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return UpdateResult(False, grad_norm, f"the gradient norm is {grad_norm}")
    settings = getattr(optimizer, "config", None)
    timers = getattr(settings, "timers", None)
    _start(timers, "optimizer-clip-main-grad")
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0.0:
            continue
        params = sub.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params, sub.config.clip_grad, grad_norm,
                sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    _stop(timers, "optimizer-clip-main-grad")
    num_zeros = None
    if getattr(settings, "log_num_zeros_in_grad", False):
        _start(timers, "optimizer-count-zeros")
        num_zeros = int(optimizer.count_zeros())  # clipping scales: zeros stay zeros
        _stop(timers, "optimizer-count-zeros")
    applied = optimizer.step_with_ready_grads()
    return UpdateResult(applied, grad_norm, None if applied else "the optimizer reported an unsuccessful update",
                        num_zeros if applied else None)


def _start(timers, name: str) -> None:
    """Start a level-1 timer of the optimizer (megatron_mile.training.timing); a no-op without timers."""
    if timers is not None:
        timers(name, log_level=1).start()


def _stop(timers, name: str) -> None:
    if timers is not None:
        timers(name).stop()


# The dtypes torch's fused CPU Adam kernel takes.
_FUSED_ADAM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def use_fused_torch_adam_on_cpu(optimizer) -> int:
    """Switch torch's Adam/AdamW inside megatron's optimizer to torch's fused kernel where it updates CPU tensors.

    Why: without Apex or Transformer Engine (always so on CPU) megatron-core builds torch.optim.AdamW with
    neither fused nor foreach, i.e. about ten element-wise passes per parameter tensor; the fused kernel makes
    one (20M-parameter benchmark model: 35-50 ms -> 10 ms per update; the step 7.7% faster). torch reads
    the flag from each param group at every step, and get_megatron_optimizer offers no way to pass it, so it
    is set here after construction, and again after a checkpoint load (torch's load_state_dict brings back
    the saved groups' flags). The update is the same Adam up to float rounding. GPU optimizers (Apex/TE
    FusedAdam) and groups holding a non-CPU tensor are left as they are. No collectives.

    Returns the number of param groups switched.
    """
    switched = 0
    for _, adam in torch_adams(optimizer):
        for group in adam.param_groups:
            if group.get("differentiable") or not group["params"]:
                continue
            if all(p.device.type == "cpu" and p.dtype in _FUSED_ADAM_CPU_DTYPES for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


def torch_adams(optimizer) -> Iterator[tuple]:
    """(megatron optimizer, torch Adam/AdamW inside it) for each part of a (chained) megatron optimizer
    that fell back to torch's Adam, i.e. ran without Apex and Transformer Engine. No collectives."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
            yield sub, inner


# ----------------------------------------------------------------------------------------------------------
# Distributed-optimizer state around a checkpoint load (megatron_mile.checkpointing.load calls these)
# ----------------------------------------------------------------------------------------------------------


def init_empty_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer zero Adam state with a step counter before loading into it.

    Why: megatron-core's DistributedOptimizer.sharded_state_dict(is_loading=True) first calls its own
    state_dict(), which (without Apex/Transformer Engine, i.e. with torch's Adam) asserts that every
    parameter's state holds one common 'step'; an optimizer that has not stepped yet holds none. The
    values put here are placeholders that the checkpoint overwrites. No collectives.
    """
    for sub, inner in torch_adams(optimizer):
        if not isinstance(sub, DistributedOptimizer):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if all(len(inner.state[p]) > 0 for p in params):
            continue
        if sub.init_state_fn is not None:
            sub.init_state_fn(inner, sub.config)
        for p in params:
            inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


def restore_distributed_optimizer_step(optimizer) -> None:
    """Put the loaded Adam step counter back into every parameter's state (distributed optimizer).

    Why: with torch's Adam, megatron-core's DistributedOptimizer keeps the step in its param groups in
    the checkpoint and sets it into each parameter's state on load, but its per-bucket state copy that
    follows overwrites 'step' with the placeholder of the freshly initialised state; the bias correction
    of the next update would then restart. The param groups keep the loaded value. No collectives.
    """
    for sub, inner in torch_adams(optimizer):
        if not isinstance(sub, DistributedOptimizer):
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                if "step" in inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
