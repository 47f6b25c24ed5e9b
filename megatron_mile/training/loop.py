"""pretrain(): set up, train for --train-iters with validation and checkpoints, report.

The spine of the fork, in the spirit of Megatron-LM's megatron/training/training.py, written on
megatron-core: what is built before the first step (setup.py: process groups, model, optimizer, data,
--load), the step and evaluation on that state (step.py), what is printed (reporting.py), the run summary
(summary.py), checkpoints (megatron_mile.checkpointing).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mile.config import RunConfig
from megatron_mile.loss import LossSpec
from megatron_mile import checkpointing, known_warnings
from megatron_mile.checkpointing.collectives import barrier
from megatron_mile.training import reporting, token_histograms
from megatron_mile.training import summary as run_summary
from megatron_mile.training.initialize import is_logging_rank, print_rank_0, print_rank_last
from megatron_mile.training.run_control import RunControl
from megatron_mile.training.optimizer import finish_parameter_gather
from megatron_mile.training.profiling import StepProfiler
from megatron_mile.training.batch_size import current_global_batch_size, micro_batches_for_step, num_micro_batches
from megatron_mile.training.setup import setup_training
from megatron_mile.training.step import evaluate, train_step
from megatron_mile.training.train_log import TrainingLog


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses); the message says why and what to do."""


@dataclass
class IterationRecord:
    iteration: int
    loss: float
    lm_loss: float
    grad_norm: Optional[float]
    learning_rate: float
    skipped: bool
    seconds: float = 0.0  # wall time of the train step (forward, backward, optimizer)


@dataclass
class TrainingResult:
    """What a finished run returns (tests compare these across layouts)."""

    history: List[IterationRecord] = field(default_factory=list)
    validation: List[tuple] = field(default_factory=list)  # (iteration, lm_loss, loss)
    test: Optional[tuple] = None  # (iteration, lm_loss, loss) on --test-data-path at the end of training
    final_iteration: int = 0
    consumed_samples: int = 0
    checkpoint: Optional[str] = None


def pretrain(config: RunConfig, model_provider=None, dataset_provider=None) -> TrainingResult:
    """Train as `config` says; return the per-iteration history. Must be called on every rank.

    model_provider(config, vocab_size) -> model chunks and dataset_provider(config, tokenizer,
    num_eval_samples) -> (train, validation) default to megatron_mile's GPT model and datasets.
    """
    t = config.training
    # The signal handler is in place before set-up (loading a checkpoint can take minutes): a signal then
    # stops the run after its first step, as in Megatron-LM. The exit budget counts from here too.
    control = RunControl(t, time.time())
    control.start()
    try:
        return _train(config, control, setup_training(config, model_provider, dataset_provider))
    finally:
        control.finish()


def _train(config: RunConfig, control: RunControl, setup) -> TrainingResult:
    """The step loop of pretrain() on a finished set-up (which it releases at the end)."""
    t = config.training
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler
    iteration, consumed_samples = setup.iteration, setup.consumed_samples

    logs = is_logging_rank()
    tensorboard = reporting.TensorBoardWriter(t.tensorboard_dir if logs else None, t.tensorboard_queue_size,
                                              reporting.start_wandb(t, setup.config_dict) if logs else None)
    progress = reporting.ProgressLine(t.train_iters, enabled=is_logging_rank() and not t.no_progress and sys.stderr.isatty())
    _print_run_summary(config, setup.vocab_size, model)

    result = TrainingResult()
    run_start = time.time()
    skipped_total = nan_total = consecutive_skips = applied_total = 0
    histogram_every = token_histograms.histogram_interval(t.log_entropy_histogram_interval, t.eval_interval,
                                                          t.tensorboard_dir)
    last_saved_iteration = iteration if t.load else None
    start_iteration, exited_early = iteration, False
    training_log = TrainingLog(config, setup, tensorboard, progress, start_iteration, run_start)
    # A resumed run is the same run: its summary continues the history of the segments before it.
    earlier = (run_summary.read_run_history(t.load, iteration, log=print_rank_last)
               if t.save and t.load and iteration > 0 and is_logging_rank() else None)

    def validate(at_iteration: int) -> None:
        """Validation loss over --eval-iters global batches: logged, to TensorBoard, kept in the result."""
        stats = evaluate(setup)
        control.after_evaluation()
        setup.consumed_valid_samples += t.eval_iters * t.global_batch_size  # checkpointed: a resume continues
        result.validation.append((at_iteration, stats.lm_loss, stats.loss))
        print_rank_last(reporting.format_validation_log(at_iteration, stats))
        scalars = {"validation/lm loss": stats.lm_loss, "validation/training loss": stats.loss}
        if t.log_validation_ppl_to_tensorboard:
            scalars["validation/lm loss PPL"] = reporting._safe_exp(stats.lm_loss)
        tensorboard.scalars(at_iteration, scalars)

    # --async-save: the writer threads' own process group, and the save still being written (at most one).
    async_group = checkpointing.async_save.checkpoint_group() if t.async_save else None
    pending = None

    def finish_pending_save(blocking: bool) -> None:
        """Commit the --async-save checkpoint in flight once every rank has written it (blocking: wait)."""
        nonlocal pending
        if pending is not None and pending.finalize(blocking):
            result.checkpoint, pending = pending.directory, None

    def save(in_background: bool = False) -> None:
        """Checkpoint `iteration`, and write the summary up to it (a resume after a crash finds its history).
        in_background: with --async-save, return while the tensors are written (committed later)."""
        nonlocal pending
        finish_pending_save(blocking=True)  # one save in flight at a time, committed in order
        finish_parameter_gather(model)  # the weights the optimizer just updated, on every rank
        saved = checkpointing.save_checkpoint(
            t.save, iteration, model, None if t.no_save_optim else optimizer, scheduler, consumed_samples,
            setup.config_dict, consumed_valid_samples=setup.consumed_valid_samples, save_rng=not t.no_save_rng,
            async_group=async_group if in_background else None,
            num_floating_point_operations_so_far=setup.num_floating_point_operations_so_far,
        )
        if isinstance(saved, str):
            result.checkpoint = saved
        else:
            pending = saved
        if is_logging_rank():
            result.final_iteration, result.consumed_samples = iteration, consumed_samples
            run_summary.write_summary(t.save, config, result, time.time() - run_start, earlier)

    profiler = StepProfiler(t)  # --profile: on the ranks of --profile-ranks only
    try:
        control.start_training()
        while iteration < t.train_iters:
            profiler.before_step(iteration + 1)
            # As Megatron-LM: the step's micro-batches from the samples consumed so far (--rampup-batch-size),
            # and a checkpoint (with --save) whenever that number changes.
            previous_micro_batches = setup.num_micro_batches
            setup.num_micro_batches = micro_batches_for_step(consumed_samples)
            if (setup.num_micro_batches != previous_micro_batches and t.save and iteration > start_iteration
                    and last_saved_iteration != iteration):
                save(in_background=True)
                last_saved_iteration = iteration
            global_batch_size = current_global_batch_size()
            histogram_step = histogram_every > 0 and (iteration + 1) % histogram_every == 0
            # The entropy for logging; a weighting that needs it (MiLe) computes it on every step anyway.
            want_entropy = (iteration + 1) % t.log_interval == 0 or histogram_step
            step_start = time.perf_counter()
            step = train_step(setup, want_entropy, keep_token_values=histogram_step)
            step_seconds = time.perf_counter() - step_start
            iteration += 1
            consumed_samples += global_batch_size
            # As Megatron-LM counts them: every iteration's model FLOPs, skipped updates included (checkpointed).
            setup.num_floating_point_operations_so_far += int(training_log.step_flops(global_batch_size))
            control.after_step(iteration)
            finish_pending_save(blocking=False)  # an --async-save checkpoint whose writers are all done
            learning_rate = optimizer.param_groups[0]["lr"]
            if step.skipped and step.overflowed:
                # fp16 loss scaling found inf/NaN in the scaled gradients: the scaler lowers the scale and
                # training goes on. Counted as skipped, as Megatron-LM does; neither a nan iteration nor one
                # towards --max-skipped-iterations (the dynamic scale starts high and comes down this way).
                skipped_total += 1
            elif step.skipped:
                skipped_total += 1
                consecutive_skips += 1
                nan_total += 1
                print_rank_last(
                    f" iteration {iteration}: {step.skipped_because} (not finite); the update was skipped "
                    f"({consecutive_skips} in a row, limit --max-skipped-iterations {t.max_skipped_iterations})"
                )
                if consecutive_skips >= t.max_skipped_iterations:
                    raise TrainingStopped(
                        f"{consecutive_skips} consecutive iterations had a non-finite loss or gradient (last at "
                        f"iteration {iteration}: {step.skipped_because}); stopping without saving. Lower --lr or "
                        "--init-method-std, check the data, or resume from the last checkpoint"
                    )
            else:
                consecutive_skips = 0
                applied_total += 1
            result.history.append(
                IterationRecord(
                    iteration, step.stats.loss, step.stats.lm_loss, step.grad_norm, learning_rate, step.skipped,
                    step_seconds,
                )
            )
            progress.update(iteration, step.stats.lm_loss)
            if histogram_step:
                _log_token_histograms(tensorboard, iteration, step)

            training_log.after_step(iteration, consumed_samples, step, learning_rate, skipped_total, nan_total,
                                    global_batch_size)

            if setup.valid_iterators is not None and iteration % t.eval_interval == 0:
                validate(iteration)

            reason = control.exit_reason(step_seconds)  # all ranks agree (a collective when enabled)
            if reason is None and t.exit_interval is not None and iteration % t.exit_interval == 0:
                reason = f"--exit-interval {t.exit_interval}"
            if t.save and (reason is not None or (t.save_interval and iteration % t.save_interval == 0)):
                save(in_background=reason is None)  # a run about to exit saves in the foreground
                last_saved_iteration = iteration
            profiler.after_step(iteration)
            if reason is not None:
                saved = "checkpoint saved" if t.save else "nothing saved: no --save"
                print_rank_0(f" exiting at iteration {iteration} ({reason}); {saved}")
                exited_early = True
                break
        if iteration > start_iteration and applied_total == 0:
            # Every update was discarded: the model is the one the run started from, so the run produced
            # nothing, and must not end as a success (nor save a checkpoint that looks trained).
            raise TrainingStopped(
                f"all {iteration - start_iteration} iterations were skipped (non-finite loss or gradient, or an "
                "fp16 overflow); the model is unchanged. Lower --lr or --init-method-std, check the data, or "
                "with --fp16 lower --initial-loss-scale (or --loss-scale)"
            )
        # As Megatron-LM does, the run ends with a validation of the final model unless it just had one.
        if (setup.valid_iterators is not None and not exited_early and iteration > start_iteration
                and iteration % t.eval_interval != 0):
            validate(iteration)
        finish_parameter_gather(model)  # whoever uses the model next sees the final weights
        if setup.test_iterators is not None and not exited_early:
            # As Megatron-LM: the test data is evaluated once, on the final model (--eval-iters batches).
            stats = evaluate(setup, setup.test_iterators)
            result.test = (iteration, stats.lm_loss, stats.loss)
            print_rank_last(reporting.format_validation_log(iteration, stats, label="test"))
            tensorboard.scalars(iteration, {"test/lm loss": stats.lm_loss, "test/training loss": stats.loss})
        if t.save and last_saved_iteration != iteration:
            save()
        finish_pending_save(blocking=True)  # the run ends with its last checkpoint committed
        result.final_iteration = iteration
        result.consumed_samples = consumed_samples
        if t.save and is_logging_rank():
            run_summary.write_summary(t.save, config, result, time.time() - run_start, earlier)
        barrier()  # the summary is written before the --save lock is given up
    finally:
        profiler.close()
        progress.finish()
        tensorboard.close()
        setup.release()  # the --save lock, on success and on failure alike
    return result


def _log_token_histograms(tensorboard: reporting.TensorBoardWriter, iteration: int, step) -> None:
    """Entropy and weight histograms of the step's loss-masked tokens over the global batch, to TensorBoard.

    Collectives: on the last pipeline stage, those of token_histograms.reduce_histograms over the DP x CP
    group (two small all-reduces); none elsewhere.
    """
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)  # every token of the global batch
    histograms = token_histograms.reduce_histograms(step.token_values, group=group)
    for quantity, histogram in zip(token_histograms.QUANTITIES, histograms):
        tensorboard.histogram_raw(iteration, token_histograms.TAGS[quantity], histogram)


def _print_run_summary(config: RunConfig, vocab_size: int, model: list) -> None:
    params = sum(p.numel() for chunk in model for p in chunk.parameters())
    totals = torch.tensor([params], dtype=torch.float64)
    if dist.is_initialized():
        # Parameters of this rank only; the sum over the model-parallel group is the model size.
        dist.all_reduce(totals, group=parallel_state.get_model_parallel_group())
    loss_desc = LossSpec.from_config(config.loss).describe()
    p, t = config.parallel, config.training
    hidden = known_warnings.summary_line()
    if hidden:
        print_rank_0(hidden)
    for note in config.notes:  # Megatron-LM flags the project provides by construction: said once
        print_rank_0(f" > {note}")
    print_rank_0(
        f" > model: {int(totals.item()):,} parameters | vocab {vocab_size} | loss {loss_desc}\n"
        f" > parallel: world {dist.get_world_size() if dist.is_initialized() else 1} = TP {p.tensor_model_parallel_size}"
        f" x PP {p.pipeline_model_parallel_size} x DP {parallel_state.get_data_parallel_world_size()}"
        f" | micro-batches per step: {num_micro_batches(config)}"
        + (f" (--rampup-batch-size: from {num_micro_batches(config, t.rampup_batch_size[0])} over the first "
           f"{t.rampup_batch_size[2]:,} samples)" if t.rampup_batch_size else "")
    )
