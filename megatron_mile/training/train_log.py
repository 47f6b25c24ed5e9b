"""What the training loop reports after each step: the log line every --log-interval iterations, the
per-iteration TensorBoard scalars every --tensorboard-log-interval, and the optional diagnostics
(--log-throughput, --log-params-norm, --log-num-zeros-in-grad, --timing-log-level,
--log-timers-to-tensorboard, --log-memory-to-tensorboard), as Megatron-LM's training_log does.

The log line's losses (lm loss, training loss, z loss) are the means over the iterations since the last
log line whose update was applied (Megatron-LM's averaging); the entropy and weight statistics are those of
the logged iteration, the only one of the interval that computes the entropy for logging.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, Optional

import torch.distributed as dist

from megatron_mile.config import RunConfig
from megatron_mile.loss import StepLoss
from megatron_mile.training import diagnostics, reporting, timing
from megatron_mile.training.flops import num_floating_point_operations, throughput_per_gpu
from megatron_mile.training.initialize import is_logging_rank
from megatron_mile.vocab import padded_vocab_size


class IntervalLosses:
    """Sums of the losses of the applied (not skipped) iterations since the last log line."""

    FIELDS = ("loss", "lm_loss", "z_loss")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.FIELDS, 0.0)
        self.count = 0

    def add(self, stats: StepLoss, skipped: bool) -> None:
        """Count an iteration's losses unless its update was skipped (its loss may not be finite)."""
        if skipped:
            return
        for name in self.FIELDS:
            self.sums[name] += getattr(stats, name)
        self.count += 1

    def mean(self, last: StepLoss) -> StepLoss:
        """`last` (the logged iteration's statistics) with the interval's mean losses; NaN losses when every
        iteration of the interval was skipped."""
        means = {name: (total / self.count if self.count else float("nan")) for name, total in self.sums.items()}
        return dataclasses.replace(last, **means)


class TrainingLog:
    """The reports of one pretrain() call; `after_step` is called on every rank after every step."""

    def __init__(self, config: RunConfig, setup, tensorboard: reporting.TensorBoardWriter,
                 progress: reporting.ProgressLine, start_iteration: int, run_start: float) -> None:
        t = config.training
        self.config, self.training = config, t
        self.model, self.timers, self.optimizer = setup.model, setup.timers, setup.optimizer
        self.tensorboard, self.progress = tensorboard, progress
        self.start_iteration, self.run_start = start_iteration, run_start
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.vocab = padded_vocab_size(setup.vocab_size, config.parallel.tensor_model_parallel_size,
                                       config.model.make_vocab_size_divisible_by)
        self.losses = IntervalLosses()
        self.interval_start = time.time()
        # Over the iterations since the last log line: their count, samples (each step's global batch, which
        # --rampup-batch-size grows) and floating-point operations.
        self.interval_iterations = self.interval_samples = 0
        self.interval_flops = 0.0

    def step_flops(self, global_batch_size: int) -> float:
        """The model's floating-point operations of one step of `global_batch_size` samples (forward and
        backward, as Megatron-LM counts them: megatron_mile.training.flops)."""
        return num_floating_point_operations(self.config.model, global_batch_size, self.vocab)

    def after_step(self, iteration: int, consumed_samples: int, step, learning_rate: float, skipped_total: int,
                   nan_total: int, global_batch_size: int) -> None:
        """Report the step just taken (`step`: a megatron_mile.training.step.StepResult) of `global_batch_size`
        samples.

        Collectives, on every rank and only when asked for: the parameters' norm (--log-params-norm, on the
        iterations that log or write TensorBoard scalars) and the timers' all-gathers (--timing-log-level
        >= 1, on logged iterations).
        """
        t = self.training
        self.interval_iterations += 1
        self.interval_samples += global_batch_size
        self.interval_flops += self.step_flops(global_batch_size)
        self.losses.add(step.stats, step.skipped)
        log_now = iteration % t.log_interval == 0
        # From the flags, not from this rank's writer: the norm is a collective every rank joins.
        writes_scalars = t.tensorboard_dir is not None or bool(t.wandb_project)
        tensorboard_now = writes_scalars and iteration % t.tensorboard_log_interval == 0
        params_norm = None
        if t.log_params_norm and (log_now or tensorboard_now):
            params_norm = diagnostics.params_l2_norm(self.model, self.config.optimizer.half_precision)
        if tensorboard_now:
            self.tensorboard.scalars(iteration, self._iteration_scalars(step, learning_rate, params_norm))
        if log_now:
            self._log_interval(iteration, consumed_samples, step, learning_rate, skipped_total, nan_total,
                               params_norm, global_batch_size)

    def loss_scale(self) -> float:
        """The optimizer's current loss scale (megatron's grad scaler under --fp16; 1.0 otherwise)."""
        return float(self.optimizer.get_loss_scale())

    def _iteration_scalars(self, step, learning_rate: float, params_norm: Optional[float]) -> Dict[str, float]:
        """The scalars of one iteration (--tensorboard-log-interval)."""
        stats = step.stats
        values = {"train/lm loss": stats.lm_loss, "train/training loss": stats.loss,
                  "train/grad norm": step.grad_norm, "train/learning rate": learning_rate,
                  "train/params norm": params_norm, "train/num zeros": step.num_zeros_in_grad}
        if stats.z_loss:
            values["train/z loss"] = stats.z_loss
        if self.config.optimizer.fp16:
            values["train/loss scale"] = self.loss_scale()  # Megatron-LM's loss-scale scalar
        if self.training.log_memory_to_tensorboard:
            values.update(diagnostics.memory_scalars())
        return values

    def _log_interval(self, iteration: int, consumed_samples: int, step, learning_rate: float,
                      skipped_total: int, nan_total: int, params_norm: Optional[float], global_batch_size: int) -> None:
        """The log line (with the logged step's global batch size, as Megatron-LM's), the interval's TensorBoard
        scalars and the timers, then a new interval."""
        t = self.training
        elapsed = time.time() - self.interval_start
        per_iteration = elapsed / self.interval_iterations
        tokens_per_second = self.interval_samples * self.config.model.seq_length / elapsed
        throughput = throughput_per_gpu(self.interval_flops / self.interval_iterations, per_iteration, self.world_size)
        # The run's average rate so far (validation and saves included, as the ETA must count them).
        rate = (iteration - self.start_iteration) / max(time.time() - self.run_start, 1e-9)
        eta = (t.train_iters - iteration) / rate
        writer = self.tensorboard.writer  # None on the ranks that do not log
        timer_text = timing.report(self.timers, t.timing_log_level, self.interval_iterations,
                                   t.log_timers_to_tensorboard, writer, iteration)
        if is_logging_rank():
            if self.progress.enabled:
                self.progress.stream.write("\r")
            print(
                reporting.format_train_log(
                    iteration, t.train_iters, consumed_samples, per_iteration * 1000.0, learning_rate,
                    global_batch_size, self.losses.mean(step.stats), step.grad_norm, tokens_per_second,
                    skipped_total, nan_total, self.config.loss.loss_type, rate, eta,
                    throughput=throughput if t.log_throughput else None,
                    num_zeros_in_grad=step.num_zeros_in_grad, params_norm=params_norm,
                    loss_scale=self.loss_scale(),
                ),
                flush=True,
            )
            if timer_text:
                print(timer_text, flush=True)
        interval = reporting.interval_scalars(step.stats, tokens_per_second)
        if t.log_timers_to_tensorboard:
            interval["train/iteration time"] = per_iteration
            if t.log_throughput:
                interval["train/throughput"] = throughput
        self.tensorboard.scalars(iteration, interval)
        self.losses.reset()
        self.interval_start, self.interval_iterations = time.time(), 0
        self.interval_samples, self.interval_flops = 0, 0.0
