"""tools/plot_comparison.py: one results table and plots for several runs (losses, or settings of one loss).

Inputs per run: its training summary ({save}/summary.json: settings, per-iteration lm loss, validation) and
its bucket evaluation (tools/eval_token_buckets.py --output-json). Outputs in --output-dir:

    results.json            every run's figures and curves (enough to redraw everything: --results-json)
    results.md              the tables: per run, per bucket, per domain (relative change vs the first run)
    lm_loss.png             plain cross-entropy (`lm loss`) over training, every run on one axis
    bucket_perplexity.png   perplexity per token-frequency bucket, runs side by side

`lm loss` is plain cross-entropy whatever the run trained on, so the curves compare directly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional, Sequence

from megatron_mile.atomic_io import atomic_path, write_text_atomic
from megatron_mile.evaluation.report import write_strict_json

PROG = "plot_comparison.py"
RESULTS_VERSION = 1


class ComparisonError(ValueError):
    """Inputs that cannot be compared; the message names the file and the fix."""


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ComparisonError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise ComparisonError(f"{what} {path} cannot be read as JSON: {error}") from None
    if not isinstance(data, dict):
        raise ComparisonError(f"{what} {path} holds no JSON object")
    return data


def _loss_label(loss_type: str, settings: dict) -> str:
    described = ", ".join(f"{k}={v:g}" for k, v in (settings or {}).items() if isinstance(v, (int, float)))
    return f"{loss_type} ({described})" if described else loss_type


def collect_run(name: str, summary_path: str, buckets_path: str) -> dict:
    """One run's entry of results.json from its summary.json and its bucket-evaluation JSON."""
    summary = _read_json(summary_path, "training summary")
    buckets = _read_json(buckets_path, "bucket evaluation")
    history = summary.get("history")
    if not isinstance(history, dict) or "lm_loss" not in history:
        raise ComparisonError(
            f"training summary {summary_path} has no per-iteration history (written by newer versions of the "
            "training loop): re-run the training to get the lm loss curve"
        )
    for key in ("buckets", "overall", "domains"):
        if key not in buckets:
            raise ComparisonError(f"bucket evaluation {buckets_path} has no {key!r}: write it with "
                                  "tools/eval_token_buckets.py --output-json")
    validation = summary.get("validation") or []
    return {
        "name": name,
        "loss": _loss_label(buckets.get("loss_type", "?"), buckets.get("loss_settings")),
        "loss_type": buckets.get("loss_type"),
        "loss_settings": buckets.get("loss_settings"),
        "iterations": summary.get("iterations"),
        "wall_seconds": summary.get("wall_seconds"),
        "final_train_lm_loss": summary.get("final_train_lm_loss_last10"),
        "final_validation_lm_loss": validation[-1]["lm_loss"] if validation else None,
        "history": {"iteration": history["iteration"], "lm_loss": history["lm_loss"]},
        "validation": [{"iteration": v["iteration"], "lm_loss": v["lm_loss"]} for v in validation],
        "buckets": {row["bucket"]: {k: row.get(k) for k in ("perplexity", "loss", "tokens", "training_fraction",
                                                             "token_ids")}
                    for row in buckets["buckets"]},
        "overall": buckets["overall"],
        "domains": {d: {k: v.get(k) for k in ("loss", "perplexity", "tokens")} for d, v in buckets["domains"].items()},
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _change(value, base) -> str:
    if value is None or base in (None, 0) or not math.isfinite(value) or not math.isfinite(base):
        return ""
    return f" ({(value / base - 1) * 100:+.1f}%)"


def markdown(results: dict) -> str:
    """The tables of results.md; percentages are relative to the first run."""
    runs = results["runs"]
    base = runs[0]
    bucket_names = list(base["buckets"])
    lines = [f"# {results.get('title') or 'Comparison'}", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    lines += [
        "| run | loss | iterations | train lm loss (last 10) | validation lm loss | perplexity (all) | "
        + " | ".join(f"perplexity ({b})" for b in bucket_names) + " | train seconds |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(bucket_names) + "---:|",
    ]
    for run in runs:
        cells = [run["name"], run["loss"], str(run["iterations"]), _fmt(run["final_train_lm_loss"]),
                 _fmt(run["final_validation_lm_loss"]),
                 _fmt(run["overall"]["perplexity"], 2) + _change(run["overall"]["perplexity"], base["overall"]["perplexity"])]
        for b in bucket_names:
            value = run["buckets"][b]["perplexity"]
            cells.append(_fmt(value, 2) + _change(value, base["buckets"][b]["perplexity"]))
        cells.append(_fmt(run["wall_seconds"], 0))
        lines.append("| " + " | ".join(cells) + " |")
    shares = ", ".join(f"{b} {base['buckets'][b]['token_ids']} token ids / "
                       f"{(base['buckets'][b]['training_fraction'] or 0) * 100:.1f}% of training tokens"
                       for b in bucket_names)
    lines += ["", f"Buckets (by training-data frequency): {shares}. Percentages: change against {base['name']}.", ""]
    domains = list(base["domains"])
    if domains:
        lines += ["## Validation lm loss per domain", "",
                  "| domain | tokens | " + " | ".join(r["name"] for r in runs) + " |",
                  "|---|---:|" + "---:|" * len(runs)]
        for d in domains:
            cells = [d, str(base["domains"][d]["tokens"])]
            for run in runs:
                value = run["domains"].get(d, {}).get("loss")
                cells.append(_fmt(value, 4) + _change(value, base["domains"][d]["loss"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![lm loss](lm_loss.png)", "", "![perplexity per bucket](bucket_perplexity.png)", ""]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ComparisonError("the plots need matplotlib: pip install -e '.[eval]' (with the torch pin as a "
                              "constraint, as tools/setup_env.sh does)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: List[Optional[float]], weight: float) -> List[Optional[float]]:
    """Exponential moving average (TensorBoard's smoothing), skipping missing values."""
    out, running = [], None
    for value in values:
        if value is None:
            out.append(None)
            continue
        running = value if running is None else weight * running + (1 - weight) * value
        out.append(running)
    return out


def _smoothing_weight(points: int) -> float:
    # Smooth over about 1/30 of the run (TensorBoard-style EMA): 0.9 for 300 steps, none for 30.
    return min(0.9, max(0.0, 1.0 - 30.0 / max(points, 1)))


def plot_lm_loss(results: dict, path: str) -> None:
    """lm loss over training per run (raw, faint; smoothed; validation points); below it, with two or more
    runs, each run's smoothed difference to the first run, where the curves themselves overlap."""
    plt = _pyplot()
    runs = results["runs"]
    if len(runs) > 1:
        figure, (axis, difference) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 1.4]})
    else:
        figure, axis = plt.subplots(figsize=(8, 5))
        difference = None
    base = {i: v for i, v in zip(runs[0]["history"]["iteration"], runs[0]["history"]["lm_loss"]) if v is not None}
    for index, run in enumerate(runs):
        color = f"C{index}"
        points = [(i, v) for i, v in zip(run["history"]["iteration"], run["history"]["lm_loss"]) if v is not None]
        if points:
            axis.plot([i for i, _ in points], [v for _, v in points], color=color, alpha=0.2, linewidth=0.8)
            smooth = _smooth([v for _, v in points], _smoothing_weight(len(points)))
            axis.plot([i for i, _ in points], smooth, color=color, linewidth=1.8, label=f"{run['name']} (train)")
        if run["validation"]:
            axis.plot([v["iteration"] for v in run["validation"]], [v["lm_loss"] for v in run["validation"]],
                      color=color, marker="o", linestyle="--", linewidth=1, label=f"{run['name']} (validation)")
        if difference is not None and index > 0:
            shared = [(i, v - base[i]) for i, v in points if i in base]
            if shared:
                smooth = _smooth([d for _, d in shared], _smoothing_weight(len(shared)))
                difference.plot([i for i, _ in shared], smooth, color=color, linewidth=1.5, label=run["name"])
    axis.set_ylabel("lm loss (plain cross-entropy, nats)")
    axis.set_title(results.get("title") or "lm loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if difference is not None:
        difference.axhline(0.0, color="C0", linewidth=1)
        difference.set_ylabel(f"minus {runs[0]['name']}\n(smoothed)")
        difference.grid(alpha=0.3)
        difference.legend(fontsize=8)
        difference.set_xlabel("iteration")
    else:
        axis.set_xlabel("iteration")
    figure.tight_layout()
    _save(figure, path, plt)


def plot_bucket_perplexity(results: dict, path: str) -> None:
    plt = _pyplot()
    runs = results["runs"]
    groups = list(runs[0]["buckets"]) + ["all"]
    figure, axis = plt.subplots(figsize=(8, 5))
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        values = [run["buckets"][g]["perplexity"] if g != "all" else run["overall"]["perplexity"] for g in groups]
        xs = [position + (index - (len(runs) - 1) / 2) * width for position in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = axis.bar(xs, heights, width, label=run["name"], color=f"C{index}")
        for bar, value in zip(bars, values):
            axis.annotate(_fmt(value, 1), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2),
                          textcoords="offset points")
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels(groups)
    axis.set_yscale("log")  # the buckets' perplexities differ by orders of magnitude
    tallest = max((r["buckets"][g]["perplexity"] if g != "all" else r["overall"]["perplexity"]) or 0.0
                  for r in runs for g in groups)
    if tallest > 0:
        axis.set_ylim(top=tallest * 4)  # headroom for the value labels above the bars
    axis.set_ylabel("validation perplexity (log scale)")
    axis.set_xlabel("target token's frequency bucket")
    axis.set_title(results.get("title") or "perplexity per bucket")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path, plt)


def _save(figure, path: str, plt) -> None:
    # Atomically: a reader never sees a half-written PNG. The format is named, as the temp name has no .png.
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(figure)


def write_outputs(results: dict, output_dir: str) -> List[str]:
    """results.json, results.md and the two PNGs in output_dir; returns their paths."""
    if not results.get("runs"):
        raise ComparisonError("no runs to compare")
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, name) for name in
             ("results.json", "results.md", "lm_loss.png", "bucket_perplexity.png")]
    plot_lm_loss(results, paths[2])
    plot_bucket_perplexity(results, paths[3])
    write_strict_json(paths[0], results)
    write_text_atomic(paths[1], markdown(results))
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--run", nargs=3, action="append", default=[], metavar=("NAME", "SUMMARY_JSON", "BUCKETS_JSON"),
                        help="A run: its name, its {save}/summary.json and its eval_token_buckets.py JSON. Repeat per "
                             "run; the first is the baseline of the relative changes.")
    parser.add_argument("--results-json", default=None,
                        help="Instead of --run: redraw the tables and plots from an earlier results.json.")
    parser.add_argument("--output-dir", required=True, help="Where results.json/.md and the PNGs are written.")
    parser.add_argument("--title", default=None, help="Title of the tables and plots.")
    parser.add_argument("--description", default=None, help="A paragraph under the title of results.md.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if bool(args.run) == bool(args.results_json):
            raise ComparisonError("give either --run NAME SUMMARY_JSON BUCKETS_JSON (repeatable) or --results-json")
        if args.results_json:
            results = _read_json(args.results_json, "results file")
            if not isinstance(results.get("runs"), list):
                raise ComparisonError(f"results file {args.results_json} has no 'runs' list")
        else:
            results = {"version": RESULTS_VERSION, "runs": [collect_run(*run) for run in args.run]}
        if args.title:
            results["title"] = args.title
        if args.description:
            results["description"] = args.description
        paths = write_outputs(results, args.output_dir)
    except (ComparisonError, KeyError, TypeError) as error:
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        print(f"{PROG}: error: {detail}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(paths))
    return 0
