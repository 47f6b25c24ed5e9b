"""Run-control flags with Megatron-LM's meaning: --manual-gc(-interval), --empty-unused-memory-level,
--exit-duration-in-mins, --logging-level, --distributed-timeout-minutes."""

from __future__ import annotations

import gc
import logging

import pytest

from megatron_mile.arguments import parse_args
from megatron_mile.training import initialize
from tiny_model import LOSS_FLAGS, TINY_LLAMA

ARGV = TINY_LLAMA + LOSS_FLAGS["cross_entropy"]


def run_counting(argv):
    """Worker body: train, counting gc.collect() calls and the loop's releases of cached GPU memory
    (run_control.empty_cached_memory, whose own behaviour test_empty_cached_memory_releases_only_with_cuda
    checks; torch.cuda itself stays untouched: torch's optimizer asks it about the device); return the counts,
    the steps run and the logging level after."""
    from megatron_mile.training import run_control
    from megatron_mile.training.loop import pretrain

    counts = {"gc": 0, "empty": 0, "gc_enabled_during": []}
    real_collect, real_empty = gc.collect, run_control.empty_cached_memory

    def collect(*args):
        counts["gc"] += 1
        counts["gc_enabled_during"].append(gc.isenabled())
        return real_collect(*args)

    def empty_cached_memory():
        counts["empty"] += 1
        real_empty()

    run_control.gc.collect = collect
    run_control.empty_cached_memory = empty_cached_memory
    try:
        steps = len(pretrain(parse_args(argv, world_size=1)).history)
    finally:
        run_control.gc.collect, run_control.empty_cached_memory = real_collect, real_empty
    return dict(counts, steps=steps, level=logging.getLogger().level, gc_enabled_after=gc.isenabled())


@pytest.mark.parametrize("cuda", [True, False])
def test_empty_cached_memory_releases_only_with_cuda(monkeypatch, cuda):
    import torch

    from megatron_mile.training import run_control

    released = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(1))
    run_control.empty_cached_memory()
    assert released == ([1] if cuda else [])


def test_defaults_do_none_of_it(dist_pool):
    out = dist_pool(1).run(run_counting, ARGV + ["--train-iters", "4"])[0]
    assert (out["gc"], out["empty"], out["steps"]) == (0, 0, 4)


def test_manual_gc_memory_level_and_logging_level(dist_pool):
    argv = ARGV + ["--train-iters", "4", "--manual-gc", "--manual-gc-interval", "2",
                   "--empty-unused-memory-level", "1", "--logging-level", "40"]
    out = dist_pool(1).run(run_counting, argv)[0]
    assert out["gc"] == 1 + 2  # once at the start, then at iterations 2 and 4
    assert out["gc_enabled_during"] == [False] * 3 and out["gc_enabled_after"]  # automatic gc off while training
    assert out["empty"] == 4  # after each step
    assert out["level"] == 40


def test_exit_duration_exits_after_the_budget(dist_pool):
    out = dist_pool(1).run(run_counting, ARGV + ["--train-iters", "4", "--exit-duration-in-mins", "0"])[0]
    assert out["steps"] == 1  # any time spent exceeds a budget of 0 minutes


def test_distributed_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(initialize.parallel, "initialize_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(initialize.parallel, "initialize_model_parallel", lambda **kw: None)
    initialize.initialize_parallel(parse_args(ARGV + ["--distributed-timeout-minutes", "60"], world_size=1))
    assert seen["timeout_minutes"] == 60
    initialize.initialize_parallel(parse_args(ARGV, world_size=1))
    assert seen["timeout_minutes"] == 10  # Megatron-LM's default
