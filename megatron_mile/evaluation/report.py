"""The bucket evaluation's results: a console table and a JSON file (written to a temp name, then renamed).

JSON layout (all losses are plain cross-entropy in nats, perplexity = exp(loss)):

    {"checkpoint": ..., "iteration": ..., "loss_type": ..., "loss_settings": {...},
     "buckets": [{"bucket": "high", "target_fraction": 0.8, "token_ids": ..., "training_occurrences": ...,
                  "training_fraction": ..., "min_count": ..., "max_count": ...,
                  "tokens": ..., "loss": ..., "perplexity": ..., "mean_entropy": ...}, ...],
     "overall": {"tokens", "loss", "perplexity", "mean_entropy"},
     "domains": {"Github": {"tokens", "loss", "perplexity", "mean_entropy", "buckets": {...}}, ...},
     "frequency_data": [{"prefix", "sequences": [begin, end]}], "validation_data": [...],
     "layout": {...}, "seconds": ...}
"""

from __future__ import annotations

import math
import os
from typing import List

from megatron_mile.atomic_io import write_json_atomic


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        lines.append(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The console table: one row per bucket (plus all tokens), then one row per domain."""
    settings = report.get("loss_settings") or {}
    described = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
    lines = [
        f" token-frequency buckets of {report['checkpoint']} (iteration {report['iteration']}, "
        f"trained with {report['loss_type']}{f' ({described})' if described else ''})",
        "",
    ]
    rows = []
    for bucket in report["buckets"]:
        rows.append([
            bucket["bucket"],
            f"{bucket['training_fraction'] * 100:.1f}%",
            _number(bucket["token_ids"]),
            f"{_number(bucket['min_count'])}-{_number(bucket['max_count'])}",
            _number(bucket["tokens"]),
            _number(bucket["loss"], 4),
            _number(bucket["perplexity"], 2),
            _number(bucket["mean_entropy"], 3),
        ])
    overall = report["overall"]
    rows.append(["all", "100.0%", _number(sum(b["token_ids"] for b in report["buckets"])), "",
                 _number(overall["tokens"]), _number(overall["loss"], 4), _number(overall["perplexity"], 2),
                 _number(overall["mean_entropy"], 3)])
    lines.append(_table(
        ["bucket", "train share", "token ids", "train counts", "valid tokens", "valid loss", "perplexity",
         "mean entropy"],
        rows,
    ))
    if report.get("domains"):
        names = [b["bucket"] for b in report["buckets"]]
        domain_rows = []
        for name, stat in report["domains"].items():
            domain_rows.append(
                [name, _number(stat["tokens"]), _number(stat["loss"], 4), _number(stat["perplexity"], 2)]
                + [_number(stat["buckets"][b]["perplexity"], 2) for b in names]
            )
        lines += ["", " validation loss per domain", "",
                  _table(["domain", "tokens", "lm loss", "perplexity"] + [f"ppl {b}" for b in names], domain_rows)]
    return "\n".join(lines)


def _finite_or_none(value):
    # Strict JSON has no NaN / Infinity: an empty bucket's loss is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_strict_json(path: str, data: dict) -> None:
    """Write `data` as strict JSON (NaN -> null) to `path` atomically, creating its directory if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, _finite_or_none(data), indent=1, allow_nan=False)
