"""--rampup-batch-size START INCREMENT SAMPLES: each step's global batch, the consumed samples, the run length
and the learning-rate schedule follow Megatron-LM (its ramp written out here, and checked against megatron-core
0.16.1's calculator where that release is installed; 0.19 has no ramp calculator and runs the ramp as a step
schedule), data-parallel layouts agree, and a run stopped during the ramp resumes into the uninterrupted run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from tiny_model import mock_data_flags, model_flags

START, INCREMENT, RAMP_SAMPLES, GLOBAL_BATCH, TRAIN_SAMPLES = 2, 2, 24, 8, 64
LR, WARMUP = 1e-3, 8


def ramp_flags(length: str = f"--train-samples {TRAIN_SAMPLES} --lr-warmup-samples {WARMUP}") -> list:
    """The tiny model on mock data with the ramp above; `length`: the run length and warmup flags."""
    return model_flags(2, 32) + mock_data_flags(300) + (
        f"--micro-batch-size 1 --global-batch-size {GLOBAL_BATCH} "
        f"--rampup-batch-size {START} {INCREMENT} {RAMP_SAMPLES} {length} --lr {LR} --min-lr 0 "
        "--lr-decay-style linear --eval-iters 0 --log-interval 100 --no-progress --seed 3"
    ).split()


ARGV = ramp_flags()


def ramp_batch(consumed: int, start=START, increment=INCREMENT, ramp_samples=RAMP_SAMPLES,
               global_batch=GLOBAL_BATCH) -> int:
    """Megatron-LM's ramp, written out (megatron-core 0.16.1's RampupBatchsizeNumMicroBatchesCalculator.update,
    which test_the_reference_ramp_is_megatron_core_0_16s_calculator checks it against where installed):
    START + int(c / (SAMPLES / n)) * INCREMENT up to SAMPLES consumed samples, n = (GLOBAL - START) / INCREMENT
    increments, then GLOBAL."""
    if consumed > ramp_samples:
        return global_batch
    return start + int(consumed / (ramp_samples / ((global_batch - start) // increment))) * increment


def reference_batches():
    """The global batch of each step, moved along by hand as Megatron-LM's loop does (the batch at the consumed
    samples, then consume it), for Megatron-LM's number of steps (update_train_iters, counted by hand: the
    ramp's steps while the consumed samples are within the ramp, then whole full batches)."""
    batches, consumed = [], 0
    while consumed <= RAMP_SAMPLES:
        batches.append(ramp_batch(consumed))
        consumed += batches[-1]
    batches += [GLOBAL_BATCH] * ((TRAIN_SAMPLES - consumed) // GLOBAL_BATCH)
    return batches


# Ramps whose per-increment samples are not whole (float rounding at the thresholds), fewer ramp samples than
# increments (several increments at one consumed count), one increment, long ones: (start, increment, samples,
# global batch).
RAMPS = [(START, INCREMENT, RAMP_SAMPLES, GLOBAL_BATCH), (16, 8, 300000, 1024), (1, 1, 10, 4), (2, 2, 7, 8),
         (4, 4, 3, 40), (3, 3, 1, 12), (8, 8, 1000, 16), (32, 32, 12345, 1024), (6, 2, 100, 8), (1, 1, 999999, 98),
         # int(SAMPLES / p) < n in floats (the full batch only past SAMPLES); a boundary one sample after the exact
         # ceil(k * SAMPLES / n) (c / p rounds below k there)
         (1, 1, 3, 60), (2, 2, 7, 52), (1, 1, 18, 15), (3, 1, 27, 24)]


@pytest.mark.parametrize("ramp", RAMPS, ids=lambda r: "-".join(map(str, r)))
def test_the_reference_ramp_is_megatron_core_0_16s_calculator(ramp):
    from megatron.core import num_microbatches_calculator as calculator

    if not hasattr(calculator, "RampupBatchsizeNumMicroBatchesCalculator"):
        pytest.skip("megatron-core 0.17+ has no ramp calculator (the reference is checked under 0.16.1)")
    start, increment, samples, global_batch = ramp
    megatron = calculator.RampupBatchsizeNumMicroBatchesCalculator(global_batch, 1, 1, False, 1, start, increment,
                                                                   samples)
    for consumed in _consumed_counts(samples):
        megatron.update(consumed, consistency_check=False)
        assert megatron.get_current_global_batch_size() == ramp_batch(consumed, *ramp), consumed


@pytest.mark.parametrize("ramp", RAMPS, ids=lambda r: "-".join(map(str, r)))
def test_the_releases_calculator_of_the_ramp_gives_megatron_lms_ramp(ramp):
    """0.16.1: its ramp calculator; 0.19: its step-schedule calculator on the schedule the ramp is rewritten to.
    Either gives Megatron-LM's batch for every consumed-sample count."""
    from megatron_mile.megatron_core_api.microbatches import ramp_calculator, rampup_step_schedule

    start, increment, samples, global_batch = ramp
    schedule = rampup_step_schedule(start, increment, samples, global_batch)
    assert schedule[0] == (0, start) and schedule[-1][1] == global_batch
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(schedule, schedule[1:]))
    released = ramp_calculator([start, increment, samples], global_batch)
    for consumed in _consumed_counts(samples):
        released.update(consumed, consistency_check=False)
        assert released.get_current_global_batch_size() == ramp_batch(consumed, *ramp), consumed
        assert max(b for c, b in schedule if c <= consumed) == ramp_batch(consumed, *ramp), consumed


def _consumed_counts(samples: int):
    """Every count up to a little past the ramp for short ramps; for long ones, the neighbourhood of every
    increment's boundary would be the same, so every count of the first and last 3000 and a stride between."""
    if samples <= 20000:
        return range(samples + 20)
    return sorted(set(range(3000)) | set(range(samples - 3000, samples + 20)) | set(range(0, samples, 97)))


def reference_lr(consumed: int) -> float:
    """Megatron-LM's schedule in samples: linear warmup over WARMUP, then linear decay to 0 at TRAIN_SAMPLES."""
    if consumed <= WARMUP:
        return LR * consumed / WARMUP
    return LR * (1 - (consumed - WARMUP) / (TRAIN_SAMPLES - WARMUP))


def train(argv, world_size):
    """Worker body: pretrain; per step (global batch from the step's micro-batches, loss, learning rate), the
    consumed samples, the run length and the checkpoint iterations in --save (if any)."""
    from megatron.core import parallel_state

    from megatron_mile.checkpointing.tracker import list_iterations
    from megatron_mile.training import loop

    config = parse_args(argv, world_size=world_size)
    original, batches = loop.train_step, []

    def recording_step(setup, *args, **kwargs):
        dp = parallel_state.get_data_parallel_world_size()
        batches.append(setup.num_micro_batches * config.training.micro_batch_size * dp)
        return original(setup, *args, **kwargs)

    loop.train_step = recording_step
    try:
        result = loop.pretrain(config)
    finally:
        loop.train_step = original
    steps = [(batch, r.loss, r.learning_rate) for batch, r in zip(batches, result.history)]
    saved = list_iterations(Path(config.training.save)) if config.training.save else []
    return steps, result.consumed_samples, config.training.train_iters, saved


@pytest.fixture(scope="module")
def uninterrupted(dist_pool, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("ramp") / "run")
    return dist_pool(1).run(train, ARGV + ["--save", save], 1)[0]


def test_each_steps_global_batch_follows_megatron_cores_calculator(uninterrupted):
    steps, consumed, train_iters, _ = uninterrupted
    expected = reference_batches()
    assert expected[:9] == [2, 2, 2, 2, 4, 4, 6, 6, 8]  # the reference itself ramps as Megatron-LM documents
    assert [batch for batch, _, _ in steps] == expected
    assert train_iters == len(expected) == 12
    assert consumed == sum(expected) == 60  # the partial last batch of the 64 samples is dropped
    total = 0
    for step, (batch, _, lr) in enumerate(steps, start=1):
        total += batch
        assert math.isclose(lr, reference_lr(total), rel_tol=1e-9, abs_tol=1e-12), (step, lr, reference_lr(total))


def test_a_checkpoint_is_saved_when_the_number_of_micro_batches_changes(uninterrupted):
    # As Megatron-LM: before the steps whose batch grows (5, 7, 9: after iterations 4, 6, 8), and at the end.
    assert uninterrupted[3] == [4, 6, 8, 12]


def test_data_parallel_ranks_share_the_ramp(dist_pool, uninterrupted):
    steps = uninterrupted[0]
    for rank_steps, consumed, _, _ in dist_pool(2).run(train, ARGV, 2):
        assert [batch for batch, _, _ in rank_steps] == reference_batches()
        assert consumed == 60
        for (_, loss, lr), (_, ref_loss, ref_lr) in zip(rank_steps, steps):
            assert math.isclose(loss, ref_loss, rel_tol=1e-5) and math.isclose(lr, ref_lr, rel_tol=1e-9)


def test_a_run_stopped_during_the_ramp_resumes_into_the_uninterrupted_run(dist_pool, tmp_path, uninterrupted):
    steps, consumed, _, _ = uninterrupted
    save = str(tmp_path / "run")
    # Iteration 6 ends with a global batch of 4 and 16 samples consumed; the next one takes 6.
    first = dist_pool(1).run(train, ARGV + ["--save", save, "--exit-interval", "6"], 1)[0]
    second = dist_pool(1).run(train, ARGV + ["--save", save, "--load", save], 1)[0]
    assert first[0] == steps[:6]
    assert second[0] == steps[6:]  # batches, losses and learning rates, bit for bit
    assert second[1] == consumed


@pytest.mark.parametrize("flags, message", [
    (["--train-iters", "10"], "--rampup-batch-size needs --train-samples"),
    (["--rampup-batch-size", "3", "2", "24"], "their difference a multiple of the increment"),
    (["--rampup-batch-size", "8", "2", "24"], "must be smaller than --global-batch-size 8"),
    (["--rampup-batch-size", "0", "2", "24"], "must be >= 1"),
    (["--micro-batch-size", "4"], "multiples of --micro-batch-size * DP = 4"),
])
def test_a_ramp_megatron_core_cannot_run_is_refused_at_start_up(flags, message):
    argv = ramp_flags("") + flags if "--train-iters" in flags else ARGV + flags
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(argv)
