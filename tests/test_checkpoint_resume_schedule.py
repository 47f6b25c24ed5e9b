"""Resuming with another learning-rate schedule than the checkpoint's: refused by default with every differing
value named, the flags' schedule with --override-opt_param-scheduler, the checkpoint's with
--use-checkpoint-opt_param-scheduler (Megatron-LM's flags and meanings). The step count always continues.

The expected learning rates are computed here from the schedule's definition (linear warmup, then cosine
decay from --lr to --min-lr), not read from megatron-core's scheduler.
"""

from __future__ import annotations

import math

import pytest
from checkpoint_cases import build, make_config, run_step

from megatron_mile import checkpointing
from megatron_mile.arguments import config_to_dict, parse_args

BASE = ["--lr", "1e-2", "--min-lr", "0", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
        "--weight-decay", "0.1", "--train-iters", "20"]
# The model and batch flags every run gives (for the flag checks parsed here without checkpoint_cases).
SHAPE = "--num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --micro-batch-size 1".split()
SAVED_AT = 12  # mid-decay: every schedule value changes the learning rate


def cosine_lr(step, max_lr, min_lr, warmup, decay):
    """The learning rate after `step` scheduler steps: warmup from 0 to max_lr, then cosine to min_lr."""
    if step <= warmup:
        return max_lr * step / warmup
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + (max_lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def worker_resume_with(directory, resume_flags, saved_at=SAVED_AT):
    """Save after `saved_at` scheduler steps with BASE, resume with BASE + resume_flags.

    Returns (error message or None, the resumed scheduler's state, the optimizer's first param group after
    loading, without its parameters)."""
    config = make_config(dropout=0.0, extra_flags=BASE)
    model, optimizer, scheduler = build(config)
    run_step(model, optimizer, scheduler, 1)
    scheduler.step(increment=saved_at - 1)
    checkpointing.save_checkpoint(directory, saved_at, model, optimizer, scheduler, 2 * saved_at,
                                  config_to_dict(config))
    resumed = make_config(dropout=0.0, extra_flags=BASE + list(resume_flags))
    model2, optimizer2, scheduler2 = build(resumed)
    try:
        checkpointing.load_checkpoint(directory, model2, optimizer2, scheduler2, config_to_dict(resumed))
    except checkpointing.CheckpointError as error:
        return str(error), None, None
    group = {key: value for key, value in optimizer2.param_groups[0].items() if key != "params"}
    return None, scheduler2.state_dict(), group


# flag -> (new value, what the message calls it, the checkpoint's value, this run's value as printed)
CHANGES = {
    "lr": (["--lr", "2e-2"], "peak learning rate (--lr)", "0.01", "0.02"),
    "min-lr": (["--min-lr", "1e-3"], "minimum learning rate (--min-lr)", "0.0", "0.001"),
    "warmup": (["--lr-warmup-iters", "3"], "warmup length in samples (--lr-warmup-iters", "2", "3"),
    "decay-length": (["--train-iters", "30"], "decay length in samples (--lr-decay-iters", "20", "30"),
    "decay-iters": (["--lr-decay-iters", "25"], "decay length in samples (--lr-decay-iters", "20", "25"),
    "decay-style": (["--lr-decay-style", "linear"], "decay style (--lr-decay-style)", "'cosine'", "'linear'"),
    "weight-decay": (["--weight-decay", "0.2"], "weight decay at the start (--weight-decay", "0.1", "0.2"),
    "adam-beta2": (["--adam-beta2", "0.95"], "Adam beta2 (--adam-beta2)", "0.999", "0.95"),
    "adam-eps": (["--adam-eps", "1e-5"], "Adam epsilon (--adam-eps)", "1e-08", "1e-05"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_differing_schedule_is_refused_naming_the_value(dist_pool, tmp_path, change):
    flags, what, saved, current = CHANGES[change]
    message, _, _ = dist_pool(1).run(worker_resume_with, str(tmp_path), flags)[0]
    assert message is not None, f"resuming with {flags} was not refused"
    assert what in message and f"checkpoint {saved}, this run {current}" in message, message
    assert "--override-opt_param-scheduler" in message and "--use-checkpoint-opt_param-scheduler" in message
    assert str(tmp_path / "iter_0000012") in message


def test_the_same_schedule_resumes_without_flags(dist_pool, tmp_path):
    message, state, group = dist_pool(1).run(worker_resume_with, str(tmp_path), [])[0]
    assert message is None
    assert state["num_steps"] == SAVED_AT
    assert group["lr"] == pytest.approx(cosine_lr(SAVED_AT, 1e-2, 0.0, 2, 20), rel=1e-12)


def test_a_longer_run_continues_with_the_flags_schedule_when_overridden(dist_pool, tmp_path):
    # 20 iterations decayed to lr 0; resumed to 30 the last 10 must not train at lr 0.
    flags = ["--train-iters", "30", "--override-opt_param-scheduler"]
    message, state, group = dist_pool(1).run(worker_resume_with, str(tmp_path), flags, 20)[0]
    assert message is None
    assert (state["num_steps"], state["lr_decay_steps"], state["max_lr"]) == (20, 30, 1e-2)
    expected = cosine_lr(20, 1e-2, 0.0, 2, 30)
    assert expected > 1e-3
    assert group["lr"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("change", ["lr", "min-lr", "warmup", "decay-iters", "weight-decay", "adam-beta2",
                                    "adam-eps"])
def test_override_takes_every_flag_value(dist_pool, tmp_path, change):
    flags = CHANGES[change][0]
    # The flags' derived spelling works as well as Megatron-LM's.
    message, state, group = dist_pool(1).run(worker_resume_with, str(tmp_path),
                                             flags + ["--override-opt-param-scheduler"])[0]
    assert message is None
    o = parse_args(SHAPE + BASE + flags + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "9"]).optimizer
    assert (state["max_lr"], state["min_lr"], state["lr_warmup_steps"], state["lr_decay_steps"],
            state["start_wd"]) == (o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters, o.weight_decay)
    assert state["num_steps"] == SAVED_AT
    expected_lr = cosine_lr(SAVED_AT, o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters)
    assert group["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert group["weight_decay"] == o.weight_decay  # the first group is decayed (wd_mult 1)
    assert group["betas"] == (o.adam_beta1, o.adam_beta2) and group["eps"] == o.adam_eps


def test_override_takes_the_decay_style(dist_pool, tmp_path):
    flags = CHANGES["decay-style"][0] + ["--override-opt_param-scheduler"]
    message, state, group = dist_pool(1).run(worker_resume_with, str(tmp_path), flags)[0]
    assert message is None and state["lr_decay_style"] == "linear"
    assert group["lr"] == pytest.approx(1e-2 * (20 - SAVED_AT) / (20 - 2), rel=1e-12)  # linear from 1e-2 to 0


def test_use_checkpoint_keeps_the_checkpoint_schedule(dist_pool, tmp_path):
    flags = ["--train-iters", "30", "--lr", "2e-2", "--adam-beta2", "0.95", "--use-checkpoint-opt_param-scheduler"]
    message, state, group = dist_pool(1).run(worker_resume_with, str(tmp_path), flags, 20)[0]
    assert message is None
    assert (state["num_steps"], state["lr_decay_steps"], state["max_lr"]) == (20, 20, 1e-2)
    assert group["lr"] == 0.0  # the checkpoint's cosine has reached --min-lr 0
    assert group["betas"] == (0.9, 0.999)


def test_both_scheduler_flags_are_refused():
    flags = SHAPE + BASE + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "9",
                    "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"]
    with pytest.raises(ValueError, match="at most one of --override-opt_param-scheduler"):
        parse_args(flags)
