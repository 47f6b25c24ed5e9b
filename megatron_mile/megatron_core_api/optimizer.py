"""Loading a megatron-core optimizer's state, where the supported releases match saved parameter groups
differently.

Both pair the saved parameter groups with the optimizer's by an identifier tuple of per-group settings
(``param_group_identifier_keys``):

- 0.16.1: structural keys only (``wd_mult``, ``lr_mult``, ``is_expert_parallel``, ``is_decoupled_lr``);
- 0.19.x: also the schedule's per-group values (``max_lr``, ``min_lr``, ``start_wd``, ``end_wd``, ...), so a
  resume whose flags change ``--lr`` or ``--min-lr`` (``--override-opt_param-scheduler``,
  ``--use-checkpoint-opt_param-scheduler``) finds no saved group and stops.

This project builds its parameter groups in the same order every run, so for the schedule's values
(SCHEDULE_KEYS, where the release matches by them) each saved group takes its positional partner's before
loading; the structural keys are still matched by megatron-core. Afterwards the caller decides which values
a group keeps (the checkpoint's, returned here, or the flags': megatron_mile.checkpointing.scheduler).
No collectives.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from megatron.core.optimizer import optimizer as _megatron_optimizer

__all__ = ["load_optimizer_state", "restore_saved_group_values"]

# The schedule's per-group values that the installed release matches saved groups by (none on 0.16.1).
SCHEDULE_KEYS = tuple(key for key in getattr(_megatron_optimizer, "param_group_identifier_keys", ())
                      if key in ("max_lr", "min_lr", "start_wd", "end_wd"))


def _saved_groups(state) -> Iterator[dict]:
    """Every saved parameter group of a (possibly chained / mixed-precision) optimizer state dict, in the
    order the optimizer's own `param_groups` lists them (depth first, as the optimizers nest)."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            yield from state["param_groups"]
            return
        for value in state.values():
            yield from _saved_groups(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _saved_groups(value)


def load_optimizer_state(optimizer, state_dict: dict) -> List[Dict[str, object]]:
    """optimizer.load_state_dict(state_dict) with the saved groups paired to the optimizer's by position on
    every release; returns each saved group's own schedule values (for restore_saved_group_values).

    Raises ValueError when the checkpoint holds another number of parameter groups than the optimizer (a
    different model or optimizer set-up; the caller's compatibility checks normally catch it first).
    """
    saved = list(_saved_groups(state_dict))
    current = optimizer.param_groups
    if SCHEDULE_KEYS and len(saved) != len(current):
        raise ValueError(f"the checkpoint's optimizer state has {len(saved)} parameter groups, this run's "
                         f"optimizer {len(current)}")
    saved_values = [{key: group[key] for key in SCHEDULE_KEYS if key in group} for group in saved]
    for saved_group, group in zip(saved, current):
        for key in SCHEDULE_KEYS:
            if key in group:
                saved_group[key] = group[key]
            else:
                saved_group.pop(key, None)
    optimizer.load_state_dict(state_dict)
    return saved_values


def restore_saved_group_values(optimizer, saved_values: List[Dict[str, object]]) -> None:
    """Give each parameter group back the checkpoint's schedule values that load_optimizer_state replaced by
    the optimizer's (what the load of 0.16.1 leaves there). No collectives."""
    for group, values in zip(optimizer.param_groups, saved_values):
        group.update(values)
