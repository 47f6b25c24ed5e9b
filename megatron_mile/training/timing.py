"""The run's timers (--timing-log-level) and their report every --log-interval.

megatron-core's Timers (megatron.core.timers) measure; the schedules, finalize_model_grads and the
optimizer start and stop the timers of their own stages when handed the object (TransformerConfig.timers,
OptimizerConfig.timers), the training step the others. A timer above the run's level is a no-op.

Level 0: the iteration time only (the log line's `elapsed time per iteration`, measured by train_log).
Level 1, stages run about once per step:
  forward-backward (the schedule), all-grads-sync and embedding-grads-all-reduce (gradient reduction),
  optimizer (the whole update) and its stages optimizer-copy-to-main-grad, optimizer-clip-main-grad,
  optimizer-count-zeros, optimizer-inner-step, optimizer-copy-main-to-model-params.
Level 2, stages run once per micro-batch (summed over the step):
  batch-generator (reading the next micro-batch), forward-compute, backward-compute and the pipeline's
  send / receive timers (forward-recv, backward-send, forward-send-backward-recv, ...).

Each is reported as milliseconds per iteration, the minimum and maximum over ranks. Level-1 timers
synchronise the ranks around their stage (megatron's barrier_with_L1_time), so levels 1 and 2 cost time.
"""

from __future__ import annotations

from typing import List, Optional

from megatron.core.timers import Timers

LEVEL_1 = (
    "forward-backward", "all-grads-sync", "embedding-grads-all-reduce", "optimizer-copy-to-main-grad",
    "optimizer-clip-main-grad", "optimizer-count-zeros", "optimizer-inner-step",
    "optimizer-copy-main-to-model-params", "optimizer",
)
LEVEL_2 = (
    "batch-generator", "forward-compute", "backward-compute", "forward-recv", "forward-send", "backward-recv",
    "backward-send", "forward-send-forward-recv", "forward-send-backward-recv", "backward-send-forward-recv",
    "backward-send-backward-recv", "forward-backward-send-forward-backward-recv",
)


def build_timers(timing_log_level: int) -> Timers:
    """megatron-core Timers at --timing-log-level, reporting the min and max over ranks (Megatron-LM's
    default --timing-log-option minmax)."""
    return Timers(timing_log_level, "minmax")


def timer_names(timing_log_level: int) -> List[str]:
    """The timers reported at a level (those never started in a run are left out of the report)."""
    return list(LEVEL_1 if timing_log_level >= 1 else ()) + list(LEVEL_2 if timing_log_level >= 2 else ())


def report(timers: Timers, timing_log_level: int, iterations: int, to_tensorboard: bool = False, writer=None,
           iteration: int = 0) -> Optional[str]:
    """The timers of the last `iterations` iterations, as ms per iteration, then reset; with
    `to_tensorboard` (--log-timers-to-tensorboard) also written to `writer`, a SummaryWriter on the logging
    rank and None on the others (`<name>-time`, seconds per iteration, max over ranks).

    Must be called on every rank with the same arguments but `writer` (all-gathers of the times over the
    world). Returns the text to print (the caller prints it on the logging rank), None when no timer ran.
    """
    names = timer_names(timing_log_level)
    if not names:
        return None
    if to_tensorboard:
        timers.write(names, writer, iteration, normalizer=iterations, reset=False)
    return timers.get_all_timers_string(names, normalizer=iterations, reset=True)
