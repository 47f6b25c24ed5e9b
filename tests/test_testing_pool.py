"""The test pool (megatron_mile.testing.distributed): workers that accumulate threads are replaced between
calls without the caller noticing, and a hung call still kills the pool."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_mile.testing import distributed
from megatron_mile.testing.distributed import DistributedPool


def start_idle_threads(count):
    """Worker body: leave `count` sleeping threads behind (as leaked gloo threads would); return this pid."""
    import os

    for _ in range(count):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    return os.getpid()


def pid():
    import os

    return os.getpid()


def test_workers_over_the_thread_limit_are_replaced_at_the_next_call(monkeypatch):
    with DistributedPool(2) as pool:
        baseline = max(pool.run(distributed._thread_count))
        monkeypatch.setattr(distributed, "RETIRE_AT_THREADS", baseline + 25)
        first = pool.run(pid)
        assert pool.run(start_idle_threads, 50) == first  # this call still ran on the old workers
        assert pool.retired and not pool.broken
        second = pool.run(pid)  # the same pool object keeps working, on fresh workers
        assert set(second).isdisjoint(first)
        assert not pool.retired


def test_a_hung_call_kills_the_pool():
    with DistributedPool(1) as pool:
        with pytest.raises(TimeoutError):
            pool.run(time.sleep, 30, timeout_s=2)
        assert pool.broken
        with pytest.raises(RuntimeError, match="killed after a hang"):
            pool.run(pid)
