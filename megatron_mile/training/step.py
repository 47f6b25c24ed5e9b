"""One optimizer step and one evaluation pass, on megatron-core's pipeline schedules.

Both take the run's TrainingSetup (megatron_mile.training.setup): the model chunks, optimizer, scheduler,
data iterators and the loss collector that the schedules' finalize hook was pointed at once, at set-up.

The loss of a step is, exactly (docs/mile-loss.md):  L = sum(w * ce) / sum(w)  over every loss-masked
token of the global batch. The schedules run in megatron's per-token-loss mode: each micro-batch's loss
function returns the UN-normalised sum(w * ce), whose gradients accumulate in DDP's buffers; then
`finalize_model_grads` divides all gradients once by the global W = sum(w), which it first broadcasts from
the last pipeline stage and all-reduces over data-parallel ranks. Because w is detached this is the exact
gradient of L, whatever the TP/PP/DP sizes and micro-batch count.

Loss scaling (--fp16, or --loss-scale): Megatron-LM's loss scale multiplies the gradient of the step's MEAN
loss (its schedules scale the per-micro-batch mean divided by the number of micro-batches). The sums here
would put W times larger values into the fp16 gradients, so a scale from a Megatron-LM script would
overflow. The schedules' grad_scale_func therefore multiplies each micro-batch's sum by
loss_scale / T, with T = this rank's tokens in the step (micro-batch size x sequence length x micro-batches),
and finalize divides by W / T instead of W: T cancels (to fp32 rounding), and the fp16 gradients hold
loss scale x the gradient of the mean loss, as in Megatron-LM. The optimizer divides by the loss scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config, unwrap_model

from megatron_mile import device
from megatron_mile.loss import MicroBatchLoss, StepLoss, all_reduce_step_loss, reduce_micro_batch
from megatron_mile.megatron_core_api.parallel import batch_on_this_context_parallel_rank
from megatron_mile.model import CE, ENTROPY, LOSS, WEIGHT, Z_LOSS, request_entropy
from megatron_mile.training.batch_size import num_micro_batches
from megatron_mile.training.optimizer import step_unless_non_finite

_STEP_LOSS_FIELDS = ("loss", "lm_loss", "weight_sum", "tokens", "mean_entropy", "weight_mean", "weight_min", "weight_max",
                     "z_loss")


class LossCollector:
    """Collects each micro-batch's MicroBatchLoss and supplies the step's gradient normaliser.

    One collector lives as long as the run (the schedules' finalize hook is bound to it at set-up);
    `start_step` clears it before each step.
    """

    def __init__(self, keep_token_values: bool = False) -> None:
        self.start_step(keep_token_values)

    def start_step(self, keep_token_values: bool = False, token_normaliser: float = 1.0) -> None:
        """Forget the previous step's micro-batches; keep per-token values this step when asked.

        token_normaliser: T of the module docstring (loss scaling only; 1 leaves the sums as they are)."""
        self.parts: List[MicroBatchLoss] = []
        self.token_normaliser = token_normaliser
        self.global_weight_sum: Optional[float] = None
        # Per-token [weight, entropy] of the loss-masked tokens, kept only when asked (histogram steps).
        self.keep_token_values = keep_token_values
        self.token_values: List[torch.Tensor] = []

    def loss_func(self, loss_mask: torch.Tensor, output: torch.Tensor):
        """Megatron schedule loss function: output [b, s, 5] (megatron_mile.model.output) -> (sum(w*l), tokens, {}).

        No communication.
        """
        part = reduce_micro_batch(output[..., LOSS], output[..., WEIGHT], loss_mask, output[..., ENTROPY],
                                  output[..., CE], output[..., Z_LOSS])
        self.parts.append(part)
        if self.keep_token_values:
            self.token_values.append(output.detach()[loss_mask > 0][:, [WEIGHT, ENTROPY]].float())  # [n, 2]
        return part.weighted_loss_sum, loss_mask.sum().to(torch.int), {}

    def local_weight_sum(self) -> torch.Tensor:
        total = sum(float(p.sums[1]) for p in self.parts)
        return torch.tensor(total, dtype=torch.float32, device=device.compute_device())

    def finalize_grads(self, model, num_tokens, pg_collection=None, force_all_reduce=False) -> None:
        """Replaces the schedules' finalize: grads / global W instead of / token count.

        Collectives: megatron's finalize_model_grads (DP all-reduce or reduce-scatter of the gradient
        buffers, or with --overlap-grad-reduce the wait for the buckets launched during backward; embedding
        all-reduce across PP stages), then W broadcast over the PP group and all-reduced over the DP x CP
        group (megatron's get_data_parallel_group(with_context_parallel=True)), then the division. The
        division follows every reduction, so the reduced buffers hold plain sums when it runs.
        """
        del num_tokens  # an int token count; the weighted loss needs the float W
        weight_sum = self.local_weight_sum()
        if self.token_normaliser != 1.0:  # loss scaling divided the sums by T (module docstring)
            weight_sum /= self.token_normaliser
        finalize_model_grads(model, num_tokens=weight_sum, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
        self.global_weight_sum = float(weight_sum) * self.token_normaliser

    def scaled_loss_func(self, optimizer) -> Callable:
        """The schedules' grad_scale_func: the micro-batch's loss sum times the optimizer's loss scale / T,
        applied once, to the loss tensor backward starts from (megatron's backward_step)."""

        def scale(loss: torch.Tensor) -> torch.Tensor:
            return optimizer.scale_loss(loss) / self.token_normaliser

        return scale


def step_statistics(parts: List[MicroBatchLoss]) -> StepLoss:
    """StepLoss of this iteration, identical on every rank.

    Collectives: on the last pipeline stage, those of all_reduce_step_loss on the DP group (with context
    parallelism the DP x CP group: each CP rank holds the statistics of its share of the tokens, as the
    gradient normaliser W does); then a broadcast of the 8 values from the last stage over the PP group.
    """
    values = torch.zeros(len(_STEP_LOSS_FIELDS), dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        step = all_reduce_step_loss(parts, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        values = torch.tensor([getattr(step, f) for f in _STEP_LOSS_FIELDS], dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        values = values.to(device.compute_device())
        dist.broadcast(
            values,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return StepLoss(**dict(zip(_STEP_LOSS_FIELDS, values.cpu().tolist())))


def make_forward_step(collector, pass_labels: bool = False, timers=None) -> Callable:
    """The forward_step_func megatron's schedules call once per micro-batch and model chunk.

    The loss function is collector.loss_func(loss_mask, output), or (loss_mask, labels, output) with
    `pass_labels` (evaluation by target token: megatron_mile.evaluation). Whether the model computes the
    entropy is set once per step beforehand (megatron_mile.model.request_entropy). The batch's attention
    mask, when the data loader builds one (block-diagonal with --reset-attention-mask), goes to the model;
    without one the attention applies its own causal mask. With context parallelism each rank keeps its
    two of the 2 * CP chunks of every sequence (megatron's get_batch_on_this_cp_rank). `timers` (the
    run's megatron Timers) times the reading of each micro-batch as batch-generator (level 2).
    """

    def forward_step(data_iterator, model):
        if timers is not None:
            timers("batch-generator", log_level=2).start()
        batch = next(data_iterator) if data_iterator is not None else None
        if timers is not None:
            timers("batch-generator").stop()
        batch = _this_context_parallel_rank(_to_compute_device(batch))
        unwrapped = unwrap_model(model)
        if batch is None:  # a middle pipeline stage: input comes from the previous stage
            output = model(None, None, None)
            return output, partial(collector.loss_func, *((None, None) if pass_labels else (None,)))
        labels = batch["labels"] if unwrapped.post_process else None
        # The fused LM head computes its gradients in forward, so the model needs the loss mask there.
        loss_mask = batch["loss_mask"] if unwrapped.post_process else None
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=labels,
                       loss_mask=loss_mask)
        inputs = (batch["loss_mask"], batch["labels"]) if pass_labels else (batch["loss_mask"],)
        return output, partial(collector.loss_func, *inputs)

    return forward_step


def _to_compute_device(batch):
    if batch is None:
        return None
    target = device.compute_device()
    return {k: v.to(target, non_blocking=True) for k, v in batch.items()}


def _this_context_parallel_rank(batch):
    """This context-parallel rank's share of the batch's sequences (the batch itself without CP)."""
    if batch is None or parallel_state.get_context_parallel_world_size() == 1:
        return batch
    return batch_on_this_context_parallel_rank(batch)


@dataclass
class StepResult:
    stats: StepLoss
    grad_norm: Optional[float]
    skipped: bool
    # Why the update was not applied (a non-finite loss or gradient norm), for the log; None when applied.
    skipped_because: Optional[str] = None
    # [n, 2] (weight, entropy) of this rank's loss-masked tokens when asked for; last pipeline stage only.
    token_values: Optional[torch.Tensor] = None
    # Gradient entries equal to zero, over all ranks (--log-num-zeros-in-grad, applied updates only).
    num_zeros_in_grad: Optional[int] = None
    # Skipped because the fp16 loss scaler found an overflow (megatron_mile.training.optimizer.UpdateResult).
    overflowed: bool = False


def configure_schedules(model: list, optimizer, collector: LossCollector, run_config, timers=None) -> None:
    """Point megatron's schedule hooks at this run's (a RunConfig) optimizer and loss collector (once, at set-up).

    `timers` (megatron.core.timers.Timers, megatron_mile.training.timing) is handed to the schedules and
    finalize_model_grads, which time their own stages with it.

    With --overlap-grad-reduce, as Megatron-LM: the schedules launch the bucket reductions themselves
    (grad_sync_func) when --align-grad-reduce (the default); with --overlap-param-gather and the interleaved
    schedule, they launch the parameter all-gathers (param_sync_func) when --align-param-gather.
    """
    config = get_model_config(model[0])

    def per_chunk(method: str):
        hooks = [getattr(chunk, method) for chunk in model]
        return hooks if len(hooks) > 1 else hooks[0]

    # Under loss scaling the scale is applied with the normaliser T (module docstring); otherwise the
    # optimizer's scale is 1 and the sums go to backward as they are.
    scaled = run_config.optimizer.fp16 or run_config.optimizer.loss_scale is not None
    config.grad_scale_func = collector.scaled_loss_func(optimizer) if scaled else optimizer.scale_loss
    config.no_sync_func = per_chunk("no_sync")
    config.finalize_model_grads_func = collector.finalize_grads
    config.timers = timers
    p = run_config.parallel
    config.grad_sync_func = per_chunk("start_grad_sync") if p.overlap_grad_reduce and p.align_grad_reduce else None
    aligned_gather = p.overlap_param_gather and p.align_param_gather and len(model) > 1
    config.param_sync_func = per_chunk("start_param_sync") if aligned_gather else None


def _run_schedule(setup, collector: LossCollector, forward_only: bool, data_iterators: list,
                  num_micro_batches: int) -> None:
    """One pass of megatron's schedule over `num_micro_batches` micro-batches."""
    model = setup.model
    get_forward_backward_func()(
        forward_step_func=make_forward_step(collector, timers=getattr(setup, "timers", None)),
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=model,
        num_microbatches=num_micro_batches,
        seq_length=setup.config.model.seq_length,
        micro_batch_size=setup.config.training.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(setup, want_entropy: bool = False, keep_token_values: bool = False) -> StepResult:
    """Forward, backward and (unless the loss is not finite) the optimizer and scheduler step.

    `setup` is the run's TrainingSetup. `want_entropy` computes the entropy for logging even when the loss
    does not need it. `keep_token_values` also returns every loss-masked token's weight and entropy
    (want_entropy must be set for the entropy to be computed); it costs one masked copy per micro-batch,
    so only ask on the steps that log them.
    """
    optimizer, collector = setup.optimizer, setup.loss_collector
    stats = compute_gradients(setup, want_entropy, keep_token_values)
    token_values = torch.cat(collector.token_values) if collector.token_values else None
    if not math.isfinite(stats.loss):
        # Never apply an update computed from a non-finite loss; the caller counts and reports it.
        _discard_gradients(setup)
        return StepResult(stats, None, skipped=True, skipped_because=f"the loss is {stats.loss}",
                          token_values=token_values)
    # Nor one whose gradient is not finite although the loss is (e.g. an overflow inside the model).
    timers = getattr(setup, "timers", None)
    if timers is not None:
        timers("optimizer", log_level=1).start(barrier=True)  # as Megatron-LM: every rank steps
    update = step_unless_non_finite(optimizer)
    if timers is not None:
        timers("optimizer").stop()
    if update.applied:
        # The schedule counts samples, as Megatron-LM's (training.optimizer.scheduler_settings): this step's
        # global batch, smaller than --global-batch-size during a --rampup-batch-size ramp.
        setup.scheduler.step(increment=step_global_batch_size(setup))
    else:
        _discard_gradients(setup)
    return StepResult(stats, update.grad_norm, skipped=not update.applied, skipped_because=update.skipped_because,
                      token_values=token_values, num_zeros_in_grad=update.num_zeros_in_grad,
                      overflowed=update.overflowed)


def compute_gradients(setup, want_entropy: bool = False, keep_token_values: bool = False) -> StepLoss:
    """Forward and backward over the next global batch of setup.train_iterators; no update.

    Leaves the exact gradient of L = sum(w * ce) / sum(w) in each parameter's main_grad (DDP's fp32 buffer,
    reduced over data-parallel ranks: a rank's shard of it with the distributed optimizer) and returns the
    step's statistics. Collectives: those of megatron's schedule and finalize (LossCollector.finalize_grads)
    and of step_statistics.
    """
    collector = setup.loss_collector
    collector.start_step(keep_token_values, loss_scale_normaliser(setup))
    request_entropy(setup.model, want_entropy)
    _discard_gradients(setup)  # the previous step's gradients
    _run_schedule(setup, collector, forward_only=False, data_iterators=setup.train_iterators,
                  num_micro_batches=setup.num_micro_batches)
    return step_statistics(collector.parts)


def step_global_batch_size(setup) -> int:
    """Samples in the coming training step over all data-parallel ranks: micro-batches x micro-batch size x DP."""
    dp = parallel_state.get_data_parallel_world_size()
    return setup.num_micro_batches * setup.config.training.micro_batch_size * dp


def loss_scale_normaliser(setup) -> float:
    """T: this rank's tokens in the coming step under loss scaling (module docstring), 1.0 without."""
    config = setup.config
    if not (config.optimizer.fp16 or config.optimizer.loss_scale is not None):
        return 1.0
    return float(config.training.micro_batch_size * config.model.seq_length * setup.num_micro_batches)


def _discard_gradients(setup) -> None:
    for chunk in setup.model:
        chunk.zero_grad_buffer()
    setup.optimizer.zero_grad()


def evaluate(setup, data_iterators=None) -> StepLoss:
    """Validation loss over --eval-iters global batches of setup.valid_iterators, or of `data_iterators`
    (the test data) (forward only, dropout off)."""
    model = setup.model
    for chunk in model:
        chunk.eval()
    collector = LossCollector()
    request_entropy(model, True)
    with torch.no_grad():
        for _ in range(setup.config.training.eval_iters):
            # As Megatron-LM, validation batches are full --global-batch-size ones, ramp or not.
            _run_schedule(setup, collector, forward_only=True,
                          data_iterators=setup.valid_iterators if data_iterators is None else data_iterators,
                          num_micro_batches=num_micro_batches(setup.config))
    for chunk in model:
        chunk.train()
    return step_statistics(collector.parts)
