"""Run control with Megatron-LM's flags: garbage collection by hand (--manual-gc, --manual-gc-interval),
releasing torch's cached GPU memory (--empty-unused-memory-level), stopping early without losing work
(--exit-signal-handler / --exit-signal, --exit-duration-in-mins) and the logging level (--logging-level).

Stopping early: the loop asks `exit_reason` after every step; every rank takes the same decision (one
all-reduce), so all ranks finish the same step, save it (with --save) and return normally: the process
exits 0 and a later job resumes from that checkpoint exactly. This is how a pre-empted or time-limited
cluster job (Slurm sends SIGTERM before it kills a job) keeps its work; docs/scale.md shows the launch side.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mile.config import TrainingConfig
from megatron_mile.config.training import EXIT_SIGNALS

DEFAULT_EXIT_SIGNAL = "SIGTERM"


class ExitSignalHandler:
    """Notes the arrival of one signal instead of dying of it (Megatron-LM's DistributedSignalHandler).

    install() replaces the signal's handler in this process (main thread only, as Python allows);
    release() puts the previous one back. `received` turns True on the first delivery and stays so; what
    to do about it is the training loop's decision, taken jointly by all ranks (RunControl.exit_reason).
    """

    def __init__(self, signal_name: str = DEFAULT_EXIT_SIGNAL):
        if signal_name not in EXIT_SIGNALS:
            raise ValueError(f"--exit-signal {signal_name}: choose one of {', '.join(EXIT_SIGNALS)}")
        self.name = signal_name
        self.signum = getattr(signal, signal_name)
        self.received = False
        self._previous = None
        self._installed = False

    def _note(self, signum, frame) -> None:
        # A handler may run between any two bytecodes: set a flag, nothing else.
        self.received = True

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("--exit-signal-handler: signal handlers can only be installed from the main thread; "
                               "run training in the process's main thread")
        self._previous = signal.signal(self.signum, self._note)
        self._installed = True

    def release(self) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False


def ignore_signal_in_worker(signal_name: str, worker_id: int = 0) -> None:
    """DataLoader worker_init_fn with --exit-signal-handler: a signal sent to the whole process group (as
    Slurm and `kill -- -PGID` do) must not kill the loader's workers while the main process finishes its
    step and saves; they stop when the main process closes the loader."""
    signal.signal(getattr(signal, signal_name), signal.SIG_IGN)


class RunControl:
    """The training loop's hooks for these flags: start() before setting up (the signal handler is in place
    from then on), after_step(iteration), after_evaluation(), exit_reason(step_seconds) when deciding to
    stop, finish() in the loop's `finally`."""

    def __init__(self, t: TrainingConfig, start_time: float):
        self.t = t
        self.start_time = start_time  # the run's start: the exit budget counts from it, set-up included
        self.gc_was_enabled = gc.isenabled()
        self.signal_handler = ExitSignalHandler(t.exit_signal) if t.exit_signal_handler else None

    def start(self) -> None:
        if self.t.logging_level is not None:
            logging.getLogger().setLevel(self.t.logging_level)
        if self.signal_handler is not None:
            self.signal_handler.install()

    def start_training(self) -> None:
        """Before the first step (after set-up and loading)."""
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

    def exit_reason(self, step_seconds: float) -> Optional[str]:
        """Why the run stops now, or None: --exit-signal-handler's signal reached any rank, or the next step
        (taking as long as the last, `step_seconds`) would end past --exit-duration-in-mins on any rank.

        Collectives: one all-reduce (MAX) of two numbers over the world group when either flag is set, so
        that every rank stops after the same iteration; none otherwise.
        """
        if self.signal_handler is None and self.t.exit_duration_in_mins is None:
            return None
        received = 1.0 if self.signal_handler is not None and self.signal_handler.received else 0.0
        minutes_after_next_step = (time.time() - self.start_time + step_seconds) / 60.0
        flags = torch.tensor([received, minutes_after_next_step], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item() > 0:
            return f"received {self.signal_handler.name}, --exit-signal-handler"
        limit = self.t.exit_duration_in_mins
        if limit is not None and flags[1].item() > limit:
            return (f"--exit-duration-in-mins {limit:g}: the next step would end {flags[1].item():.2f} minutes "
                    "after the start")
        return None

    def finish(self) -> None:
        if self.t.manual_gc and self.gc_was_enabled:
            gc.enable()
        if self.signal_handler is not None:
            self.signal_handler.release()


def empty_cached_memory() -> None:
    """Give torch's cached, unused GPU memory back to the driver; CPU runs hold no such cache."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
