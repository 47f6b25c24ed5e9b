"""What the benchmark scripts share: fresh worker processes, resident-memory readings, markdown tables.

Imported by the scripts as `_harness` (they run as `python benchmarks/<script>.py`, which puts this
directory on sys.path, and so do the processes they start).

- `run_worker` / `emit_result`: a measurement runs in a fresh interpreter (`<script> --worker ...`), so that
  no earlier job's allocations, caches or threads disturb it; the worker prints its result as JSON on its
  last stdout line and the parent reads it back.
- `rss_bytes`, `peak_rss_bytes`, `reset_peak_rss`: this process's resident memory and its high-water mark
  (Linux /proc); resetting the mark before a call makes the next peak the call's own (`call_peak_memory`).
- `markdown_table`, `report`: the results tables printed for BENCHMARKS.md (and the raw rows as JSON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, Iterable, Optional, Sequence


def run_worker(script: str, *args: Any) -> Any:
    """Run `python script --worker *args` to completion; return the JSON value on its last stdout line.

    Raises subprocess.CalledProcessError (with the worker's output) when it fails.
    """
    command = [sys.executable, script, "--worker", *map(str, args)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def emit_result(result: Any) -> None:
    """Worker side of run_worker: print the result as the last stdout line."""
    print(json.dumps(result), flush=True)


def rss_bytes() -> int:
    """Resident memory of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: the high-water mark of this process's resident memory, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so the next peak is the call's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def call_peak_memory(call: Callable[[], Any]) -> Dict[str, int]:
    """Run `call()` once; {"call_peak": its peak resident bytes above those held before it,
    "process_peak": the whole process's peak so far, the call included}."""
    process_peak_so_far = peak_rss_bytes()
    reset_peak_rss()
    before = rss_bytes()
    call()
    peak = peak_rss_bytes()
    return {"call_peak": peak - before, "process_peak": max(peak, process_peak_so_far)}


def report(rows: list, table: str, json_path: Optional[str] = None) -> None:
    """The end of a benchmark: the raw rows to `json_path` when given, the markdown table to stdout."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    print(table)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    """A markdown table: `header` cells, then one line per row (cells formatted by the caller or str()).

    `align` gives one letter per column, 'l' (default) or 'r' (right-aligned, `---:`).
    """
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
