"""The preprocessing tool's worker processes: results in input order, bounded memory, and workers that never
outlive the tool.

Why not multiprocessing.Pool: a worker that dies (killed for memory, a crash in native code) makes it
replace the worker, lose the batch and wait for its result forever; concurrent.futures' pool raises
instead. Why more than its shutdown(): a SIGTERM or Ctrl-C can arrive at any point, including while the
pool is forking its workers, before it has recorded them. So the pool here

- remembers which child processes existed before it started, and on stop() terminates (then kills) every
  child started since, recorded by the executor or not, with SIGINT/SIGTERM ignored meanwhile so that a
  second signal cannot cut the clean-up short;
- gives every worker a watchdog thread that ends it as soon as its parent is gone, even after a SIGKILL of
  the parent, which no clean-up code in the parent can handle;
- makes workers ignore Ctrl-C (the terminal sends it to the whole process group; the parent decides) and
  take SIGTERM's default action (they must not inherit the parent's handler).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Optional

# How often a worker checks that its parent is still alive.
_WATCHDOG_INTERVAL_S = 0.5
# How long stop() waits for terminated workers before killing them.
_TERMINATE_GRACE_S = 5.0


class WorkerDied(RuntimeError):
    """A worker process died while the pool was in use."""


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent is gone: nobody will read this worker's results
        time.sleep(_WATCHDOG_INTERVAL_S)


def _start_worker(parent_pid: int, initializer: Optional[Callable], initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """``workers`` forked processes running ``initializer(*initargs)`` once each; see the module docstring."""

    def __init__(self, workers: int, initializer: Optional[Callable] = None, initargs: tuple = ()) -> None:
        self.workers = workers
        self._children_before = {p.pid for p in multiprocessing.active_children()}
        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_start_worker,
                                             initargs=(os.getpid(), initializer, initargs))

    def ordered_map(self, fn: Callable, work: Iterable) -> Iterator:
        """fn(item) for each item of ``work``, yielded in input order, with at most 2 * workers items in
        flight, so memory stays bounded however long ``work`` is.

        Raises:
            WorkerDied: a worker process died.
        """
        in_flight: collections.deque = collections.deque()
        work = iter(work)
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < 2 * self.workers:
                item = next(work, None)
                if item is None:
                    exhausted = True
                else:
                    in_flight.append(self._executor.submit(fn, item))
            if not in_flight:
                return
            try:
                yield in_flight.popleft().result()
            except BrokenProcessPool:
                raise WorkerDied("a worker process died (killed for memory, or crashed)") from None

    def close(self) -> None:
        """Wait for the workers to finish and exit (after the work is done)."""
        self._executor.shutdown(wait=True)

    def stop(self) -> None:
        """End every worker now: pending work is cancelled, running work is abandoned."""
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main_thread:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, signal.SIG_IGN)
        try:
            self._executor.shutdown(wait=False, cancel_futures=True)
            workers = [p for p in multiprocessing.active_children() if p.pid not in self._children_before]
            for process in workers:
                process.terminate()
            deadline = time.time() + _TERMINATE_GRACE_S
            for process in workers:
                process.join(timeout=max(0.0, deadline - time.time()))
                if process.is_alive():
                    process.kill()
                    process.join(timeout=_TERMINATE_GRACE_S)
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: a handler installed from C, which cannot be restored
                    signal.signal(signum, handler)
