"""The learning-rate and weight-decay schedule and Adam's settings across a resume: the checkpoint's against
this run's flags.

megatron-core's OptimizerParamScheduler stores its settings with its step count. When a resumed run's flags
set another schedule (a longer --train-iters, which is also the default decay length; a new --lr, --min-lr,
warmup, decay style or weight decay), one of the two must win, and silently keeping the checkpoint's is the
worst choice: a cosine decay to --min-lr 0 over 20 iterations, resumed with --train-iters 30, trains its last
10 iterations at learning rate 0. As Megatron-LM, the default is to refuse, naming every value that differs;
``--override-opt_param-scheduler`` takes the flags' values, ``--use-checkpoint-opt_param-scheduler`` the
checkpoint's. The step count always continues from the checkpoint. Adam's beta1, beta2 and epsilon (and the
per-group peak/minimum learning rates megatron-core keeps) travel in the optimizer's param groups, which
loading the optimizer state replaces: they are checked and decided by the same two flags.

Units: the scheduler counts samples, as Megatron-LM's does (it steps by the global batch size;
megatron_mile.training.optimizer.scheduler_settings), so its state dict is Megatron-LM's as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_mile.checkpointing.errors import CheckpointError

# The policies of a resume: refuse a differing schedule, take the flags', take the checkpoint's.
CHECK, OVERRIDE, USE_CHECKPOINT = "check", "override", "use_checkpoint"

# (state-dict key, what it is, the flag that sets it), in OptimizerParamScheduler.state_dict's terms.
SCHEDULE_VALUES = (
    ("max_lr", "peak learning rate", "--lr"),
    ("min_lr", "minimum learning rate", "--min-lr"),
    ("lr_warmup_steps", "warmup length in samples", "--lr-warmup-iters / --lr-warmup-samples"),
    ("lr_decay_steps", "decay length in samples", "--lr-decay-iters / --lr-decay-samples (default: the run length)"),
    ("lr_decay_style", "decay style", "--lr-decay-style"),
    ("start_wd", "weight decay at the start", "--weight-decay / --start-weight-decay"),
    ("end_wd", "weight decay at the end", "--weight-decay / --end-weight-decay"),
    ("wd_incr_style", "weight-decay increment style", "--weight-decay-incr-style"),
    # Only shapes the weight decay when it changes over training (--weight-decay-incr-style linear or cosine).
    ("wd_incr_steps", "weight-decay increment length in samples", "--train-iters / --train-samples"),
)

# (RunConfig.optimizer field, what it is, the flag): the settings loading the optimizer state brings back.
OPTIMIZER_VALUES = (
    ("adam_beta1", "Adam beta1", "--adam-beta1"),
    ("adam_beta2", "Adam beta2", "--adam-beta2"),
    ("adam_eps", "Adam epsilon", "--adam-eps"),
)
# The param-group entries that come from the flags (lr and weight_decay are the scheduler's to set).
_GROUP_FLAG_KEYS = ("max_lr", "min_lr", "betas", "eps")



def scheduler_policy(config_dict: dict) -> str:
    """CHECK, OVERRIDE or USE_CHECKPOINT from the run's --override-/--use-checkpoint-opt_param-scheduler."""
    training = config_dict.get("training", {})
    if training.get("override_opt_param_scheduler"):
        return OVERRIDE
    if training.get("use_checkpoint_opt_param_scheduler"):
        return USE_CHECKPOINT
    return CHECK


def schedule_differences(saved: dict, current: dict, saved_optimizer: Optional[dict] = None,
                         current_optimizer: Optional[dict] = None) -> list:
    """One line per schedule value (scheduler state dicts `saved`, `current`) and Adam setting (RunConfig
    optimizer sections, when given) that differs: 'what (flag): checkpoint X, this run Y'."""
    lines = []
    if saved_optimizer is not None and current_optimizer is not None:
        for key, what, flag_name in OPTIMIZER_VALUES:
            if key in saved_optimizer and _differs(saved_optimizer[key], current_optimizer.get(key)):
                lines.append(f"{what} ({flag_name}): checkpoint {saved_optimizer[key]!r}, "
                             f"this run {current_optimizer.get(key)!r}")
    for key, what, flag_name in SCHEDULE_VALUES:
        if key not in saved:
            continue
        if key == "wd_incr_steps" and saved.get("wd_incr_style") == current.get("wd_incr_style") == "constant":
            continue  # the increment length of a constant weight decay changes nothing
        if _differs(saved[key], current.get(key)):
            lines.append(f"{what} ({flag_name}): checkpoint {saved[key]!r}, this run {current.get(key)!r}")
    return lines


def _differs(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


def check_schedule(scheduler, saved: dict, policy: str, checkpoint_dir: Path, saved_optimizer: Optional[dict] = None,
                   current_optimizer: Optional[dict] = None) -> None:
    """Under CHECK, raise CheckpointError listing every schedule value of `saved` (the checkpoint's
    OptimizerParamScheduler.state_dict(), in iterations) that differs from `scheduler`'s (the flags'), and
    every Adam setting of `saved_optimizer` that differs from `current_optimizer` (RunConfig optimizer
    sections), with both numbers and the two flags that decide. Nothing under the other policies. No
    collectives."""
    if policy != CHECK:
        return
    differing = schedule_differences(saved, scheduler.state_dict(), saved_optimizer, current_optimizer)
    if differing:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} was trained with another learning-rate schedule than this "
            "run's flags set:\n  - " + "\n  - ".join(differing)
            + "\nPass --override-opt_param-scheduler to continue with the flags' schedule (from the "
            "checkpoint's iteration), or --use-checkpoint-opt_param-scheduler to keep the checkpoint's"
        )


def flag_group_values(optimizer) -> list:
    """Per param group, the entries that come from the flags (peak/minimum lr, betas, eps): taken from a
    fresh optimizer before loading, for reapply_flag_group_values. No collectives."""
    return [{key: group[key] for key in _GROUP_FLAG_KEYS if key in group} for group in optimizer.param_groups]


def reapply_flag_group_values(optimizer, values: list, policy: str) -> None:
    """Put the flags' param-group entries (flag_group_values) back after the optimizer state was loaded,
    unless `policy` keeps the checkpoint's. Under CHECK they equal the loaded ones (check_schedule passed).
    No collectives."""
    if policy == USE_CHECKPOINT:
        return
    for group, own in zip(optimizer.param_groups, values):
        group.update(own)


def restore_scheduler(scheduler, saved: dict, policy: str, checkpoint_dir: Path) -> None:
    """Load `saved` (in iterations) into `scheduler` under `policy`, after check_schedule.

    OVERRIDE keeps the scheduler's (the flags') values, USE_CHECKPOINT and CHECK (where they agree) take the
    saved ones. The step count is the checkpoint's in every case, and the optimizer's learning rate and
    weight decay are set for it. Raises as check_schedule. No collectives.
    """
    check_schedule(scheduler, saved, policy, checkpoint_dir)
    # megatron-core's load_state_dict decides per value with these two attributes (its constructor's arguments).
    scheduler.override_opt_param_scheduler = policy == OVERRIDE
    scheduler.use_checkpoint_opt_param_scheduler = policy != OVERRIDE
    scheduler.num_steps = 0  # load_state_dict steps forward by the saved count
    scheduler.load_state_dict(dict(saved))
