"""Profiling a range of training steps with Megatron-LM's flags: --profile, --profile-step-start,
--profile-step-end, --profile-ranks and --use-pytorch-profiler.

Two modes, as in Megatron-LM:

- torch.profiler (--use-pytorch-profiler; CPU and GPU): the steps numbered start .. end - 1 (the iteration
  numbers the log prints) are recorded with operator shapes and Python stacks, each step a
  `ProfilerStep#<iteration>` range, and the trace is written when step end - 1 is done, by torch's
  TensorBoard trace handler, to `<--tensorboard-dir>/rank<global rank>.<time>.pt.trace.json`. Megatron-LM
  counts its schedule from the run's first step; here the numbers are the global iterations, the same on a
  fresh run, and a resumed run profiles the same steps as an uninterrupted one would.
- nsys (GPU): before step start + 1, cudaProfilerStart and torch's NVTX ranges per operator; after step end,
  cudaProfilerStop (Megatron-LM's bracket), for a launch under `nsys profile --capture-range=cudaProfilerApi
  --capture-range-end=stop`.

Only the ranks in --profile-ranks profile; the others do nothing. No collectives.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_mile.config import TrainingConfig


def _record_every_step(step: int) -> torch.profiler.ProfilerAction:
    """torch.profiler schedule: record; the range's end is the StepProfiler's stop()."""
    return torch.profiler.ProfilerAction.RECORD


class StepProfiler:
    """Starts and stops the profiler around the configured steps; the loop calls `before_step(n)` before step
    n (1-based, the number the log prints), `after_step(n)` after it (validation and saving included), and
    `close()` once at the end (on an early exit it writes what was recorded)."""

    def __init__(self, t: TrainingConfig, rank: Optional[int] = None, gpu: Optional[bool] = None):
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        if gpu is None:
            gpu = torch.cuda.is_available()
        self.enabled = t.profile and rank in t.profile_ranks
        self.start, self.end = t.profile_step_start, t.profile_step_end
        self.use_pytorch_profiler = t.use_pytorch_profiler
        self.directory = t.tensorboard_dir
        self.rank, self.gpu = rank, gpu
        self._torch_profiler = None
        self._nvtx = None
        self._done = False

    # torch.profiler: steps [start, end).
    def _torch_begin(self, iteration: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.gpu:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # The schedule records every step from start() to stop(), when the handler writes the trace (giving a
        # schedule also makes torch mark each step as a ProfilerStep#<n> range). step_num: the first one's n.
        profiler = torch.profiler.profile(
            activities=activities, schedule=_record_every_step, record_shapes=True, with_stack=True,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.directory, worker_name=f"rank{self.rank}"),
        )
        profiler.step_num = iteration
        profiler.start()
        self._torch_profiler = profiler

    def _torch_finish(self) -> None:
        profiler, self._torch_profiler = self._torch_profiler, None
        if profiler is not None:
            profiler.stop()  # closes the last step's range and calls the trace handler
            self._done = True

    # nsys: cudaProfilerStart before step start + 1, cudaProfilerStop after step end.
    def _nsys_begin(self) -> None:
        torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
        self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
        self._nvtx.__enter__()

    def _nsys_finish(self) -> None:
        if self._nvtx is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            self._nvtx.__exit__(None, None, None)
            self._nvtx = None
            self._done = True

    def before_step(self, iteration: int) -> None:
        """Called before step `iteration` (1-based)."""
        if not self.enabled or self._done:
            return
        if self.use_pytorch_profiler:
            if self._torch_profiler is not None:
                self._torch_profiler.step()
            elif self.start <= iteration < self.end:
                self._torch_begin(iteration)
        elif self._nvtx is None and iteration == self.start + 1:
            self._nsys_begin()

    def after_step(self, iteration: int) -> None:
        """Called after step `iteration` (1-based) and what the loop does after it."""
        if not self.enabled:
            return
        if self.use_pytorch_profiler and iteration >= self.end - 1:
            self._torch_finish()
        elif not self.use_pytorch_profiler and iteration >= self.end:
            self._nsys_finish()

    def close(self) -> None:
        """End a profile still running (a run that stopped inside the range)."""
        self._torch_finish()
        self._nsys_finish()
