"""Megatron-LM's profiling flags: --profile with --use-pytorch-profiler writes a torch.profiler trace of
steps [--profile-step-start, --profile-step-end) on the ranks of --profile-ranks only, nothing without
--profile; the nsys mode needs a GPU; bad combinations stop the run at start-up."""

from __future__ import annotations

import json

import pytest

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from tiny_model import mock_data_flags, model_flags

TINY = model_flags(num_layers=1, hidden_size=32) + mock_data_flags(300) + (
    "--micro-batch-size 2 --global-batch-size 4 --no-progress --train-iters 5 --eval-iters 0".split())


def train(argv):
    """Worker body: the iterations trained."""
    from megatron_mile.training.loop import pretrain

    return [r.iteration for r in pretrain(parse_args(argv, world_size=2)).history]


def traces(directory):
    return sorted(directory.glob("*.pt.trace.json"))


def trace_events(path):
    return json.loads(path.read_text())["traceEvents"]


def test_pytorch_profiler_traces_the_steps_in_range_on_the_listed_ranks_only(dist_pool, tmp_path):
    tb = tmp_path / "tb"
    argv = TINY + ["--tensorboard-dir", str(tb), "--profile", "--use-pytorch-profiler",
                   "--profile-step-start", "2", "--profile-step-end", "4"]
    assert dist_pool(2).run(train, argv) == [[1, 2, 3, 4, 5]] * 2
    written = traces(tb)
    assert [p.name.split(".")[0] for p in written] == ["rank0"]  # default --profile-ranks 0
    events = trace_events(written[0])
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}
    # Independent of those labels: torch.optim records each optimizer step; two steps were recorded.
    optimizer_steps = [e for e in events if e.get("name", "").startswith("Optimizer.step#")]
    assert len(optimizer_steps) == 2, sorted({e["name"] for e in optimizer_steps})

    other = tmp_path / "tb1"
    argv = TINY + ["--tensorboard-dir", str(other), "--profile", "--use-pytorch-profiler", "--profile-ranks", "1",
                   "--profile-step-start", "4", "--profile-step-end", "5"]
    dist_pool(2).run(train, argv)
    written = traces(other)
    assert [p.name.split(".")[0] for p in written] == ["rank1"]
    steps = {e["name"] for e in trace_events(written[0]) if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#4"}


def test_without_profile_no_trace_is_written(dist_pool, tmp_path):
    tb = tmp_path / "tb"
    dist_pool(2).run(train, TINY + ["--tensorboard-dir", str(tb)])
    assert tb.is_dir() and traces(tb) == []


@pytest.mark.parametrize("extra, message", [
    (["--profile"], "--profile without --use-pytorch-profiler starts and stops nsys"),
    (["--use-pytorch-profiler", "--tensorboard-dir", "tb"], "--use-pytorch-profiler only acts with --profile"),
    (["--profile", "--use-pytorch-profiler"], "--use-pytorch-profiler writes its trace into --tensorboard-dir"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-step-start", "3",
      "--profile-step-end", "3"], "--profile-step-start 3 and --profile-step-end 3"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-ranks", "0", "2"],
     "--profile-ranks 2: no such rank"),
])
def test_bad_profiling_flags_stop_at_start_up(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY + extra, world_size=2, gpu_available=False)


def test_defaults_are_megatron_lms():
    t = parse_args(TINY).training
    assert (t.profile, t.profile_step_start, t.profile_step_end, t.profile_ranks, t.use_pytorch_profiler) == (
        False, 10, 12, [0], False)
