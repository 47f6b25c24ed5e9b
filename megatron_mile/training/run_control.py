"""Run control with Megatron-LM's flags: garbage collection by hand (--manual-gc, --manual-gc-interval),
releasing torch's cached GPU memory (--empty-unused-memory-level), exiting after a wall-clock budget
(--exit-duration-in-mins) and the logging level (--logging-level)."""

from __future__ import annotations

import gc
import logging
import time

import torch
import torch.distributed as dist

from megatron_mile.config import TrainingConfig


class RunControl:
    """The training loop's hooks for these flags: start() before the first step, after_step(iteration),
    after_evaluation(), out_of_time() when deciding to exit, finish() in the loop's `finally`."""

    def __init__(self, t: TrainingConfig, start_time: float):
        self.t = t
        self.start_time = start_time  # the run's start: the exit budget counts from it
        self.gc_was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.t.logging_level is not None:
            logging.getLogger().setLevel(self.t.logging_level)
        if self.t.manual_gc:
            # As Megatron-LM: collect once, then only when asked, so that no rank pauses on its own.
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.t.manual_gc and self.t.manual_gc_interval and iteration % self.t.manual_gc_interval == 0:
            gc.collect()
        if self.t.empty_unused_memory_level >= 1:
            empty_cached_memory()

    def after_evaluation(self) -> None:
        if self.t.empty_unused_memory_level >= 2:
            empty_cached_memory()

    def out_of_time(self) -> bool:
        """True once --exit-duration-in-mins minutes have passed on any rank.

        Collectives: one all-reduce (MAX) of one number over the world group when the flag is set, so that
        every rank exits at the same iteration.
        """
        if self.t.exit_duration_in_mins is None:
            return False
        minutes = torch.tensor([(time.time() - self.start_time) / 60.0], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(minutes, op=dist.ReduceOp.MAX)
        return minutes.item() > self.t.exit_duration_in_mins

    def finish(self) -> None:
        if self.t.manual_gc and self.gc_was_enabled:
            gc.enable()


def empty_cached_memory() -> None:
    """Give torch's cached, unused GPU memory back to the driver; CPU runs hold no such cache."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
