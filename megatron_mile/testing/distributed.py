"""Run a function in N local processes with torch.distributed and megatron's parallel state set up.

Used by the tests and the benchmarks (a plain `pytest` exercises tensor, pipeline and data parallelism on
CPU over gloo, with no torchrun) and by tools/import_hf.py (its T x P processes). Starting a process costs seconds (importing torch and megatron), so a
`DistributedPool` keeps its workers alive and runs many functions on them; each call re-initialises
megatron's parallel state with the layout it asks for and tears it down in `finally`.

Functions sent to the pool must be importable by name from a module (spawned workers unpickle them), and
their arguments and results must be picklable.
"""

from __future__ import annotations

import gc
import os
import queue
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import distributed_c10d

from megatron.core import tensor_parallel

from megatron_mile import parallel

# Seconds a single call may take before the pool is declared hung and killed.
DEFAULT_CALL_TIMEOUT_S = 300.0
# After one rank fails, seconds to wait for the others: a rank that raised mid-collective leaves its peers
# blocked in that collective, and they only come back when gloo's own timeout fires.
STRAGGLER_TIMEOUT_S = 60.0
# gloo's collective timeout in pool workers: a peer that died or raised must not block a test for the
# default 10-30 minutes.
WORKER_COLLECTIVE_TIMEOUT_MINUTES = 2.0


@dataclass(frozen=True)
class ParallelLayout:
    """The megatron parallel state one call runs under (data parallel size = world / (tp * pp))."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None


class RemoteError(RuntimeError):
    """A worker raised; the message holds every failing rank's traceback."""


def _record_new_groups() -> list:
    """Make torch.distributed.new_group remember every group it creates, in the returned list.

    Why: megatron's destroy_model_parallel only forgets its groups, and each gloo group keeps its worker
    threads and sockets until destroyed. A pool worker runs hundreds of calls, each initialising parallel
    state anew; without this it accumulated thousands of threads and the machine's load average ran into
    the thousands.
    """
    created: list = []
    create = dist.new_group

    def recording_new_group(*args, **kwargs):
        group = create(*args, **kwargs)
        created.append(group)
        return group

    dist.new_group = recording_new_group
    return created


def _destroy_groups(groups: list) -> None:
    """Destroy the recorded groups this rank belongs to (purely local for subgroups), then forget them."""
    for group in groups:
        # Skip non-members and groups something else (megatron, a test body) destroyed already.
        if group is not None and group in distributed_c10d._world.pg_map:
            dist.destroy_process_group(group)
    groups.clear()


def _worker_main(rank: int, world_size: int, port: int, tasks, results, threads: int) -> None:
    """Body of one pool process: set up gloo once, then run tasks until told to stop."""
    # Each worker gets its share of the cores; oversubscription makes gloo tests crawl.
    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    parallel.initialize_process_group(backend="gloo", timeout_minutes=WORKER_COLLECTIVE_TIMEOUT_MINUTES)
    created_groups = _record_new_groups()
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args, kwargs, layout = task
            try:
                parallel.initialize_model_parallel(
                    tensor_model_parallel_size=layout.tensor_model_parallel_size,
                    pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
                    virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
                    distributed_timeout_minutes=WORKER_COLLECTIVE_TIMEOUT_MINUTES,
                )
                value = fn(*args, **kwargs)
                results.put((rank, True, value, _thread_count()))
            except BaseException:  # noqa: BLE001 - the traceback is the report
                results.put((rank, False, traceback.format_exc(), _thread_count()))
            finally:
                parallel.destroy_model_parallel()
                # Why: megatron's model-parallel RNG tracker outlives the parallel state; a call that builds a
                # model without seeding it would pass or fail by what ran before it in this worker.
                tensor_parallel.get_cuda_rng_tracker().reset()
                _destroy_groups(created_groups)
                gc.collect()  # what a call left in reference cycles (models, optimizers) goes now
    finally:
        parallel.shutdown()


def _thread_count() -> int:
    """Threads of this process (native ones included: gloo's), from /proc; 0 where there is no /proc."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


# A worker holding more threads than this after a call retires its workers (the pool's next call starts new
# ones). Why: megatron-core keeps the process groups of every training run's parallel state alive past
# destroy_model_parallel (~50 gloo threads per pretrain() call at world size 2), and workers that ran hundreds
# of calls held thousands of threads, driving the machine's load average into the thousands.
RETIRE_AT_THREADS = 600


class DistributedPool:
    """`world_size` spawned processes joined in one gloo process group, reused across calls.

    Example::

        with DistributedPool(2) as pool:
            per_rank = pool.run(my_test_body, tensor_model_parallel_size=2)
    """

    def __init__(self, world_size: int, threads_per_rank: Optional[int] = None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
        # Set once a call timed out or left ranks stuck (the workers were killed): the pool is unusable.
        self.broken = False
        self._start_workers()

    def _start_workers(self) -> None:
        ctx = mp.get_context("spawn")
        port = parallel.find_free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, port, self._tasks[rank], self._results, self._threads),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        # Set when the workers hold too many threads after a call (RETIRE_AT_THREADS): they were stopped, and
        # the next call starts fresh ones (callers that keep the pool across calls see no difference).
        self.retired = False

    def run(
        self,
        fn: Callable,
        *args: Any,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: Optional[int] = None,
        timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        **kwargs: Any,
    ) -> list:
        """Run fn(*args, **kwargs) on every rank; return the per-rank results, in rank order.

        Raises RemoteError when any rank raised (every failing rank's traceback in the message) and
        TimeoutError when the call hung. Either way a hung or half-failed pool is killed and marked
        `broken`, so that one bad test cannot stall every test after it.
        """
        if self.broken:
            raise RuntimeError("this DistributedPool was killed after a hang; start a new one")
        if self.retired:
            self._start_workers()
        layout = ParallelLayout(
            tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size
        )
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs, layout))
        name = getattr(fn, "__name__", fn)
        outcomes: dict[int, tuple[bool, Any]] = {}
        most_threads = 0
        while len(outcomes) < self.world_size:
            any_failed = any(not ok for ok, _ in outcomes.values())
            wait_s = min(timeout_s, STRAGGLER_TIMEOUT_S) if any_failed else timeout_s
            try:
                rank, ok, value, threads = self._results.get(timeout=wait_s)
            except queue.Empty:
                self.close(force=True)
                failures = self._failure_report(outcomes)
                if failures:
                    raise RemoteError(
                        f"{name} failed; ranks {sorted(set(range(self.world_size)) - set(outcomes))} did not "
                        f"return within {wait_s:.0f} s after it (the pool was killed)\n{failures}"
                    ) from None
                raise TimeoutError(
                    f"{name} did not finish on all {self.world_size} ranks within {timeout_s:.0f} s "
                    f"(ranks done: {sorted(outcomes)}); the pool was killed"
                ) from None
            outcomes[rank] = (ok, value)
            most_threads = max(most_threads, threads)
        if most_threads > RETIRE_AT_THREADS:
            self.close()
            self.retired = True
        failures = self._failure_report(outcomes)
        if failures:
            raise RemoteError(failures)
        return [outcomes[r][1] for r in range(self.world_size)]

    @staticmethod
    def _failure_report(outcomes: dict) -> str:
        return "\n".join(f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok)

    def close(self, force: bool = False) -> None:
        """Stop the workers; `force` kills them (used after a hang) and marks the pool broken."""
        if force:
            self.broken = True
        for proc, task_queue in zip(self._procs, self._tasks):
            if proc.is_alive() and not force:
                task_queue.put(None)
        for proc in self._procs:
            if force:
                proc.kill()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> "DistributedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_distributed(fn: Callable, world_size: int, *args: Any, **run_kwargs: Any) -> list:
    """One-shot form of DistributedPool.run: start `world_size` processes, run fn, tear them down."""
    with DistributedPool(world_size) as pool:
        return pool.run(fn, *args, **run_kwargs)


def split_evenly(items: Sequence, parts: int, index: int) -> Sequence:
    """The index-th of `parts` equal contiguous slices of items (len(items) must divide evenly)."""
    if len(items) % parts:
        raise ValueError(f"{len(items)} items do not split into {parts} equal parts")
    step = len(items) // parts
    return items[index * step : (index + 1) * step]
