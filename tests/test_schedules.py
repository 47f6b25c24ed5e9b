"""Learning-rate and weight-decay schedules with Megatron-LM's flags and meaning: lengths in samples
(iteration flags times the global batch size), --train-samples, warmup as a fraction or from
--lr-warmup-init, WSD's stable phase before its final anneal, weight-decay increments, SGD, --decoupled-lr.

The expected values are Megatron-LM's formulas written out here (its get_optimizer_param_scheduler and the
schedule's definition), not numbers read from the code under test.
"""

from __future__ import annotations

import math

import pytest

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from megatron_mile.training.optimizer import scheduler_settings
from tiny_model import LOSS_FLAGS, TINY_LLAMA


def without(flags, *names):
    """`flags` without the given flags and their single values."""
    out, skip = [], False
    for item in flags:
        if skip:
            skip = False
        elif item in names:
            skip = True
        else:
            out.append(item)
    return out


BASE = without(TINY_LLAMA, "--train-iters", "--lr-warmup-iters", "--lr-decay-style", "--lr") + LOSS_FLAGS["mile"]


def settings(*extra):
    return scheduler_settings(parse_args(BASE + list(extra), world_size=1))


def test_iteration_flags_count_samples():
    # global batch 8: Megatron-LM multiplies every iteration length by it.
    s = settings("--train-iters", "10", "--lr-decay-iters", "6", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine")
    assert (s["lr_decay_steps"], s["lr_warmup_steps"], s["wd_incr_steps"]) == (48, 16, 80)
    assert s["wsd_decay_steps"] is None


def test_sample_flags_are_taken_as_they_are():
    s = settings("--train-samples", "100", "--lr-decay-samples", "90", "--lr-warmup-samples", "12")
    assert (s["lr_decay_steps"], s["lr_warmup_steps"], s["wd_incr_steps"]) == (90, 12, 100)
    assert parse_args(BASE + ["--train-samples", "100"], world_size=1).training.train_iters == 100 // 8
    assert settings("--train-samples", "100")["lr_decay_steps"] == 100  # default: --train-samples


def test_warmup_fraction_and_init():
    s = settings("--train-iters", "10", "--lr-warmup-fraction", "0.25", "--lr-warmup-init", "1e-5")
    assert s["lr_warmup_steps"] == 0.25 * 80 and s["init_lr"] == 1e-5


def test_weight_decay_increment():
    s = settings("--train-iters", "10", "--start-weight-decay", "0.01", "--end-weight-decay", "0.1",
                 "--weight-decay-incr-style", "linear")
    assert (s["start_wd"], s["end_wd"], s["wd_incr_style"]) == (0.01, 0.1, "linear")
    s = settings("--train-iters", "10", "--weight-decay", "0.05")
    assert (s["start_wd"], s["end_wd"], s["wd_incr_style"]) == (0.05, 0.05, "constant")


@pytest.mark.parametrize("extra, message", [
    (["--train-iters", "5", "--train-samples", "40"], "one of --train-iters or --train-samples"),
    ([], "the run length is required"),
    (["--train-iters", "5", "--lr-decay-samples", "40"], "--lr-decay-samples needs --train-samples"),
    (["--train-samples", "40", "--lr-warmup-iters", "1"], "--lr-warmup-iters needs --train-iters"),
    (["--train-iters", "5", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "1"], "one of --lr-warmup-fraction"),
    (["--train-iters", "5", "--lr-decay-style", "WSD"], "needs --lr-wsd-decay-iters"),
    (["--train-iters", "5", "--start-weight-decay", "0.1", "--end-weight-decay", "0.2"], "--weight-decay-incr-style"),
    (["--train-iters", "5", "--decoupled-min-lr", "1e-5"], "--decoupled-min-lr needs --decoupled-lr"),
])
def test_inconsistent_schedule_flags_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(BASE + extra, world_size=1)


# ---------------------------------------------------------------------------------- in a training run


def learning_rates(argv, world_size):
    """Worker body: the learning rate after each step of a run."""
    from megatron_mile.training.loop import pretrain

    return [r.learning_rate for r in pretrain(parse_args(argv, world_size=world_size)).history]


def test_wsd_holds_the_peak_then_anneals_over_its_own_length(dist_pool):
    # 8 iterations of 8 samples, warmup 1 iteration, anneal over the last 3 (linear): decay length 64
    # samples, anneal from sample 40. Megatron-LM's values after each step (samples 8, 16, ..., 64):
    lr, min_lr = 1e-3, 1e-4
    argv = BASE + ["--train-iters", "8", "--lr", str(lr), "--min-lr", str(min_lr), "--lr-warmup-iters", "1",
                   "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "3", "--lr-wsd-decay-style", "linear"]
    expected = [lr] * 5 + [min_lr + (1 - n / 3) * (lr - min_lr) for n in (1, 2)] + [min_lr]
    got = dist_pool(1).run(learning_rates, argv, 1)[0]
    assert got == pytest.approx(expected, rel=1e-9)


def test_sample_based_warmup_and_cosine_decay_in_a_run(dist_pool):
    lr, min_lr, init = 1e-3, 1e-5, 1e-4
    argv = BASE + ["--train-samples", "40", "--lr-warmup-samples", "12", "--lr-decay-samples", "36",
                   "--lr-warmup-init", str(init), "--lr", str(lr), "--min-lr", str(min_lr),
                   "--lr-decay-style", "cosine"]

    def megatron_lr(n):
        if n <= 12:
            return init + (lr - init) * n / 12
        if n > 36:
            return min_lr
        return min_lr + 0.5 * (math.cos(math.pi * (n - 12) / 24) + 1) * (lr - min_lr)

    got = dist_pool(1).run(learning_rates, argv, 1)[0]
    assert got == pytest.approx([megatron_lr(n) for n in (8, 16, 24, 32, 40)], rel=1e-9)


def optimizer_groups(argv):
    """Worker body: the torch optimizer class, its momentum and each param group's peak learning rate."""
    from megatron_mile.training.optimizer import build_optimizer, wrap_for_training
    from tiny_model import build_tiny_model, tiny_config

    config = tiny_config(argv)
    model = wrap_for_training(config, build_tiny_model(config, 300))
    optimizer, _ = build_optimizer(config, model)
    groups = [g for sub in getattr(optimizer, "chained_optimizers", [optimizer]) for g in sub.optimizer.param_groups]
    inner = optimizer.chained_optimizers[0].optimizer if hasattr(optimizer, "chained_optimizers") else optimizer.optimizer
    return type(inner).__name__, groups[0].get("momentum"), sorted({g["max_lr"] for g in groups})


def test_sgd_and_decoupled_lr_reach_megatrons_optimizer(dist_pool):
    argv = BASE + ["--train-iters", "3", "--lr", "1e-3"]
    name, _, max_lrs = dist_pool(1).run(optimizer_groups, argv)[0]
    assert name in ("AdamW", "Adam") and max_lrs == [1e-3]
    name, momentum, max_lrs = dist_pool(1).run(
        optimizer_groups, argv + ["--optimizer", "sgd", "--sgd-momentum", "0.8", "--decoupled-lr", "5e-3"])[0]
    assert name == "SGD" and momentum == 0.8
    assert max_lrs == [1e-3, 5e-3]  # the embedding and output layer have their own peak
