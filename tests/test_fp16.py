"""--fp16 with loss scaling (--loss-scale, --initial-loss-scale, --min-loss-scale, --loss-scale-window,
--hysteresis): megatron-core's Float16Module and mixed-precision optimizer with its grad scaler.

Checked on CPU against independent references: the fp32 run of the same model and seed (fp16 rounding), the
dynamic scaler's rule as Megatron-LM states it (halve after --hysteresis overflows, never below
--min-loss-scale; a constant --loss-scale never moves), the weights before a skipped step, and the TP 1 run.
"""

from __future__ import annotations

import contextlib
import io
import math
import re

import pytest

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from tiny_model import LOSS_FLAGS, TINY_LLAMA

ARGV = TINY_LLAMA + LOSS_FLAGS["mile"]

# fp16 keeps 11 significant bits (unit roundoff 2**-11 = 4.9e-4). The tiny model's activations and logits are
# rounded to fp16, its loss statistics and main weights stay fp32: over 3 steps the loss stays within about
# 4 fp16 roundoffs of the fp32 run and the gradient norm within about 10 (seen: 3e-4 and 1.3e-3 relative).
# A loss scale left in the gradients (or applied twice) moves the norm by the scale itself (>= 128x).
LOSS_REL_TOL, GRAD_REL_TOL = 2e-3, 5e-3


def train_history(argv, world_size=1):
    """Worker body: pretrain; [(loss, grad_norm, skipped)] per step and the dtypes of the model's weights."""
    from megatron_mile.model import build_model
    from megatron_mile.training.loop import pretrain

    built = []

    def recording_build_model(config, vocab_size):
        built.extend(build_model(config, vocab_size))
        return built

    result = pretrain(parse_args(argv, world_size=world_size), model_provider=recording_build_model)
    # After training: the chunks as wrapped for it (Float16Module casts them in place).
    dtypes = {str(p.dtype) for chunk in built for p in chunk.parameters()}
    return [(r.loss, r.grad_norm, r.skipped) for r in result.history], sorted(dtypes)


@pytest.fixture(scope="module")
def fp32_history(dist_pool):
    return dist_pool(1).run(train_history, ARGV)[0][0]


def assert_follows(history, reference, context):
    assert len(history) == len(reference) == 3, context
    for step, ((loss, grad_norm, skipped), (ref_loss, ref_norm, _)) in enumerate(zip(history, reference), start=1):
        assert not skipped, (context, step)
        assert math.isclose(loss, ref_loss, rel_tol=LOSS_REL_TOL), (context, step, loss, ref_loss)
        assert math.isclose(grad_norm, ref_norm, rel_tol=GRAD_REL_TOL), (context, step, grad_norm, ref_norm)


@pytest.mark.parametrize("scale", ["128", "4096"])
def test_fp16_training_follows_the_fp32_run(dist_pool, fp32_history, scale):
    history, dtypes = dist_pool(1).run(train_history, ARGV + ["--fp16", "--loss-scale", scale])[0]
    assert dtypes == ["torch.float16"]  # the model really ran in fp16 ...
    assert_follows(history, fp32_history, scale)
    assert any(h[0] != r[0] for h, r in zip(history, fp32_history))  # ... and its rounding shows


def test_fp16_at_tp2_equals_tp1(dist_pool):
    argv = ARGV + ["--fp16", "--loss-scale", "1024"]
    tp1, _ = dist_pool(1).run(train_history, argv)[0]
    for rank_history, _ in dist_pool(2).run(train_history, argv + ["--tensor-model-parallel-size", "2"], 2):
        assert_follows(rank_history, tp1, "tp2")


# For the hand-taken steps: no warmup, so that every applied step moves the weights (the first step of a
# warmup has a learning rate of 0) and an unchanged weight means a skipped update.
STEP_ARGV = ARGV + ["--lr-warmup-iters", "0"]


def step_scales(argv, steps):
    """Worker body: set up training and take `steps` train steps by hand; per step whether it was skipped and
    as an overflow, the loss scale after it, whether the weights are the ones before it and the samples the
    learning-rate schedule has counted; and the type of each grad scaler."""
    import torch

    from megatron_mile.training.setup import setup_training
    from megatron_mile.training.step import train_step

    setup = setup_training(parse_args(argv, world_size=1))
    try:
        records = []
        for _ in range(steps):
            before = [p.detach().clone() for chunk in setup.model for p in chunk.parameters()]
            step = train_step(setup)
            after = [p.detach() for chunk in setup.model for p in chunk.parameters()]
            records.append(dict(
                skipped=step.skipped, overflowed=step.overflowed,
                scale=float(setup.optimizer.get_loss_scale()),
                unchanged=all(torch.equal(a, b) for a, b in zip(before, after)),
                scheduler_steps=setup.scheduler.num_steps,
            ))
        subs = getattr(setup.optimizer, "chained_optimizers", [setup.optimizer])
        return records, [type(sub.grad_scaler).__name__ for sub in subs]
    finally:
        setup.release()


def test_an_overflow_skips_the_step_and_the_scale_halves_after_hysteresis_overflows(dist_pool):
    # 2**40 times the gradient overflows fp16 whatever the step: every step overflows. Megatron-LM's rule:
    # the first --hysteresis - 1 overflows keep the scale, each later one halves it.
    argv = STEP_ARGV + ["--fp16", "--initial-loss-scale", str(2.0 ** 40), "--hysteresis", "3", "--train-iters", "5"]
    records, scaler = dist_pool(1).run(step_scales, argv, 4)[0]
    assert set(scaler) == {"DynamicGradScaler"}
    assert [r["scale"] for r in records] == [2.0 ** 40, 2.0 ** 40, 2.0 ** 39, 2.0 ** 38]
    for r in records:
        assert r["skipped"] and r["overflowed"] and r["unchanged"], r
        assert r["scheduler_steps"] == 0  # a skipped step does not advance the learning-rate schedule


def test_the_scale_never_goes_below_min_loss_scale(dist_pool):
    argv = STEP_ARGV + ["--fp16", "--initial-loss-scale", str(2.0 ** 42), "--min-loss-scale", str(2.0 ** 41),
                   "--hysteresis", "1", "--train-iters", "5"]
    records, _ = dist_pool(1).run(step_scales, argv, 3)[0]
    assert [r["scale"] for r in records] == [2.0 ** 41] * 3
    assert all(r["skipped"] and r["unchanged"] for r in records)


def test_a_static_loss_scale_stays_constant(dist_pool):
    # Through applied steps (128) and through overflows (2**40) alike: ConstantGradScaler.
    applied, scaler = dist_pool(1).run(step_scales, STEP_ARGV + ["--fp16", "--loss-scale", "128"], 3)[0]
    assert set(scaler) == {"ConstantGradScaler"}
    assert [r["scale"] for r in applied] == [128.0] * 3
    assert not any(r["skipped"] or r["unchanged"] for r in applied)
    assert [r["scheduler_steps"] for r in applied] == [8, 16, 24]
    overflowing, _ = dist_pool(1).run(step_scales, STEP_ARGV + ["--fp16", "--loss-scale", str(2.0 ** 40)], 2)[0]
    assert [r["scale"] for r in overflowing] == [2.0 ** 40] * 2
    assert all(r["skipped"] and r["overflowed"] and r["unchanged"] for r in overflowing)


def train_capturing_stdout(argv):
    """Worker body: pretrain, returning the skipped flags of the history and what rank 0 printed."""
    from megatron_mile.training.loop import pretrain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = pretrain(parse_args(argv, world_size=1))
    return [r.skipped for r in result.history], out.getvalue()


def test_overflows_are_counted_and_the_log_shows_the_loss_scale(dist_pool):
    # The scale starts high enough to overflow a few times (each halving it: --hysteresis 1), more often
    # than --max-skipped-iterations allows non-finite losses: overflows are expected, and do not stop the run.
    argv = ARGV + ["--fp16", "--initial-loss-scale", str(2.0 ** 20), "--hysteresis", "1", "--train-iters", "7",
                   "--log-interval", "1", "--max-skipped-iterations", "1"]
    skipped, stdout = dist_pool(1).run(train_capturing_stdout, argv)[0]
    assert sum(skipped) >= 2 and not all(skipped), skipped
    lines = [line for line in stdout.splitlines() if "consumed samples:" in line]
    assert len(lines) == 7
    scale, count = 2.0 ** 20, 0
    for line, was_skipped in zip(lines, skipped):
        if was_skipped:  # the reference rule: each overflow halves the scale (--hysteresis 1)
            scale, count = scale / 2, count + 1
        assert f"| loss scale: {scale:.1f} |" in line, line
        assert re.search(rf"number of skipped iterations: +{count} \|", line), line
        assert re.search(r"number of nan iterations: +0 \|", line), line  # overflows are not NaN losses


def test_without_fp16_the_log_shows_a_loss_scale_of_one(dist_pool):
    skipped, stdout = dist_pool(1).run(train_capturing_stdout, ARGV + ["--log-interval", "1"])[0]
    assert not any(skipped)
    assert stdout.count("| loss scale: 1.0 |") == 3


@pytest.mark.parametrize("flags, message", [
    (["--fp16", "--bf16"], "give one of --fp16 and --bf16"),
    (["--loss-scale", "128"], "--loss-scale needs --fp16"),
    (["--initial-loss-scale", "1024"], "--initial-loss-scale: dynamic loss scaling only"),
    (["--fp16", "--loss-scale", "128", "--hysteresis", "4"], "--hysteresis: dynamic loss scaling only"),
    (["--fp16", "--loss-scale", "0"], "--loss-scale must be > 0"),
    (["--fp16", "--hysteresis", "0"], "--hysteresis must be >= 1"),
    (["--fp16", "--initial-loss-scale", "2", "--min-loss-scale", "4"], "--min-loss-scale 4.0 exceeds"),
])
def test_contradictory_or_unread_loss_scaling_flags_are_refused(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(ARGV + flags)


def test_the_scale_doubles_after_loss_scale_window_clean_steps(dist_pool):
    argv = STEP_ARGV + ["--fp16", "--initial-loss-scale", "128", "--loss-scale-window", "2", "--train-iters", "5"]
    records, _ = dist_pool(1).run(step_scales, argv, 4)[0]
    assert [r["scale"] for r in records] == [128.0, 256.0, 256.0, 512.0]
    assert [r["scheduler_steps"] for r in records] == [8, 16, 24, 32]  # applied: the schedule counts samples


def test_a_resumed_fp16_run_continues_the_loss_scale(dist_pool, tmp_path):
    # The dynamic scaler's state (scale, growth and hysteresis trackers) is in the checkpoint: with a window
    # of 2 and overflows early on, a scaler restarted from its flags would scale differently after the resume.
    argv = ARGV + ["--fp16", "--initial-loss-scale", str(2.0 ** 15), "--hysteresis", "1", "--loss-scale-window", "2",
                   "--train-iters", "8", "--log-interval", "1"]

    def scales(stdout):
        return [float(s) for s in re.findall(r"\| loss scale: ([0-9.]+) \|", stdout)]

    def losses(stdout):
        return re.findall(r"\| lm loss: ([^ ]+) \|", stdout)

    _, whole = dist_pool(1).run(train_capturing_stdout, argv + ["--save", str(tmp_path / "whole")])[0]
    save = str(tmp_path / "parts")
    _, first = dist_pool(1).run(train_capturing_stdout, argv + ["--save", save, "--exit-interval", "3"])[0]
    _, second = dist_pool(1).run(train_capturing_stdout, argv + ["--save", save, "--load", save])[0]
    moves = list(zip(scales(whole), scales(whole)[1:]))
    assert len(scales(whole)) == 8 and any(b > a for a, b in moves) and any(b < a for a, b in moves)  # grew and fell
    assert scales(first) + scales(second) == scales(whole)
    assert losses(first) + losses(second) == losses(whole)
