"""{save}/summary.json: a run's settings, final figures, per-iteration curves and validation losses.

A run resumed with --load is the same run: its summary keeps the history and validation of the iterations
before the resumed one (read from {load}/summary.json), drops what the earlier segment did after it (an
abandoned branch, e.g. iterations after the checkpoint it resumes from), and appends its own. The file is
rewritten at every checkpoint, so that a resume after a crash finds the history up to its checkpoint.
tools/plot_comparison.py (megatron_mile.evaluation.comparison) draws the curves from it.

Format: a JSON object; "history" holds columns of equal length ("iteration" strictly increasing ints;
"lm_loss", "loss" numbers or null; "skipped" booleans; "seconds" numbers); "validation" is a list of
{"iteration", "lm_loss", "ppl", "training_loss"}.
"""

from __future__ import annotations

import json
import math
import os
from numbers import Real
from typing import List, Optional

from megatron_mile.arguments import config_to_dict
from megatron_mile.atomic_io import write_json_atomic
from megatron_mile.config import RunConfig

SUMMARY_FILENAME = "summary.json"
HISTORY_COLUMNS = ("iteration", "lm_loss", "loss", "skipped", "seconds")


class SummaryFormatError(ValueError):
    """A summary.json does not hold what this module writes; the message says what is wrong."""


def read_run_history(load_dir: str, iteration: int, log=print) -> dict:
    """{"history": columns, "validation": entries, "wall_seconds": float} of the run in
    `load_dir`/summary.json up to and including `iteration` (the one resumed from).

    A missing, unreadable or invalid file gives empty history with a `log` line (the run goes on; only its
    summary is shorter). No collectives.
    """
    empty = {"history": {column: [] for column in HISTORY_COLUMNS}, "validation": [], "wall_seconds": 0.0}
    path = os.path.join(load_dir, SUMMARY_FILENAME)
    if not os.path.isfile(path):
        log(f" note: {path} does not exist: the run summary will start at iteration {iteration + 1}")
        return empty
    try:
        with open(path, encoding="utf-8") as handle:
            summary = validate_summary(json.load(handle))
    except (OSError, ValueError) as error:  # json.JSONDecodeError and SummaryFormatError are ValueErrors
        log(f" note: ignoring {path} ({error}): the run summary will start at iteration {iteration + 1}")
        return empty
    history, kept = summary["history"], [i <= iteration for i in summary["history"]["iteration"]]
    earlier = {
        "history": {column: [v for v, keep in zip(history[column], kept) if keep] for column in HISTORY_COLUMNS},
        "validation": [entry for entry in summary["validation"] if entry["iteration"] <= iteration],
        "wall_seconds": float(summary.get("wall_seconds") or 0.0),
    }
    last = earlier["history"]["iteration"][-1] if earlier["history"]["iteration"] else 0
    if last < iteration:
        log(f" note: {path} records iterations up to {last} only; the run summary misses {last + 1}..{iteration}")
    return earlier


def validate_summary(summary) -> dict:
    """`summary` (parsed JSON) when it has the history and validation this module writes; else raises
    SummaryFormatError naming the first problem."""
    if not isinstance(summary, dict):
        raise SummaryFormatError("not a JSON object")
    history = summary.get("history")
    if not isinstance(history, dict) or not all(isinstance(history.get(c), list) for c in HISTORY_COLUMNS):
        raise SummaryFormatError(f"'history' must hold the columns {', '.join(HISTORY_COLUMNS)}")
    iterations = history["iteration"]
    if any(len(history[c]) != len(iterations) for c in HISTORY_COLUMNS):
        raise SummaryFormatError("the 'history' columns differ in length")
    if not all(_is_int(i) for i in iterations) or any(a >= b for a, b in zip(iterations, iterations[1:])):
        raise SummaryFormatError("'history.iteration' must be strictly increasing integers")
    for column in ("lm_loss", "loss", "seconds"):
        if not all(v is None or _is_number(v) for v in history[column]):
            raise SummaryFormatError(f"'history.{column}' must hold numbers or null")
    if not all(isinstance(v, bool) for v in history["skipped"]):
        raise SummaryFormatError("'history.skipped' must hold booleans")
    validation = summary.get("validation")
    if not isinstance(validation, list) or not all(
        isinstance(e, dict) and _is_int(e.get("iteration")) and _is_number(e.get("lm_loss")) for e in validation
    ):
        raise SummaryFormatError("'validation' must be a list of {iteration, lm_loss, ...} entries")
    if summary.get("wall_seconds") is not None and not _is_number(summary["wall_seconds"]):
        raise SummaryFormatError("'wall_seconds' must be a number")
    return summary


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def write_summary(save_dir: str, config: RunConfig, result, seconds: float, earlier: Optional[dict] = None) -> None:
    """Write `save_dir`/summary.json (atomically) for `result` (a TrainingResult: this segment's history and
    validation), after `earlier` (read_run_history of the run's previous segments) when resumed.

    `seconds` is this segment's wall time; the file's wall_seconds adds the earlier segments'. No collectives.
    """
    history = {column: list(values) for column, values in (earlier or {}).get("history", {}).items()}
    history = {column: history.get(column, []) for column in HISTORY_COLUMNS}
    for record in result.history:
        history["iteration"].append(record.iteration)
        history["lm_loss"].append(_finite_or_none(record.lm_loss))
        history["loss"].append(_finite_or_none(record.loss))
        history["skipped"].append(record.skipped)
        history["seconds"].append(round(record.seconds, 4))
    validation = list((earlier or {}).get("validation", [])) + [
        {"iteration": i, "lm_loss": lm, "ppl": math.exp(min(lm, 50)), "training_loss": loss}
        for i, lm, loss in result.validation
    ]
    summary = {
        "iterations": result.final_iteration,
        "consumed_samples": result.consumed_samples,
        "wall_seconds": round((earlier or {}).get("wall_seconds", 0.0) + seconds, 1),
        "loss_type": config.loss.loss_type,
        "final_train_lm_loss_last10": _recent_mean(history, "lm_loss"),
        "final_train_loss_last10": _recent_mean(history, "loss"),
        "validation": validation,
        # Per-iteration curves of the whole run (columns, to stay compact).
        "history": history,
        "checkpoint": result.checkpoint,
        "config": config_to_dict(config),
    }
    os.makedirs(save_dir, exist_ok=True)
    write_json_atomic(os.path.join(save_dir, SUMMARY_FILENAME), summary, indent=1)


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _recent_mean(history: dict, column: str) -> Optional[float]:
    """Mean of `column` over the last 10 iterations that were not skipped; None when there are none."""
    recent: List[float] = [
        value for value, skipped in zip(history[column][-10:], history["skipped"][-10:])
        if not skipped and value is not None
    ]
    return sum(recent) / len(recent) if recent else None
