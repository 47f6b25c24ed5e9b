"""What the preprocessing tool prints: progress lines with rates and an ETA, the bad-input report, the summary.

Progress: the first line comes after ``--log-interval`` documents (so a user sees at once that the run is
under way), later ones after at least ``--log-interval`` more documents and ``PROGRESS_MIN_SECONDS``, so a
fast run does not flood the terminal. The share done and the ETA follow the on-disk bytes read
(readers.InputProgress), which works for compressed input whose decompressed size is unknown.

Bad input: one line per kind, once, at the end: how many lines, what was done with them, and where the
first few are (``path:line``).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Dict, List, Optional

from megatron_mile.data.readers import InputProgress

# Bad-input kinds, as reported.
BAD_INPUT_REASONS = {
    "invalid_utf8": "line is not valid UTF-8",
    "malformed_json": "line is not valid JSON",
    "not_an_object": "JSON value is not an object",
    "missing_key": "a --json-keys key is missing or not a string (or list of strings)",
    "missing_domain": "meta.pile_set_name is missing",
    "untokenizable": "the tokenizer rejected the text",
    "empty_text": "text is empty",
}
# Kinds whose document is still written (as an empty document, as Megatron-LM writes it).
KEPT_REASONS = {"empty_text"}
EXAMPLES_PER_REASON = 5
PROGRESS_MIN_SECONDS = 5.0


def format_rate(documents: int, n_bytes: int, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    return f"{documents / seconds:,.0f} docs/s, {n_bytes / seconds / 2**20:.2f} MB/s"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressLog:
    """Throttled progress lines (see the module docstring); ``update`` after every batch of results."""

    def __init__(self, emit: Callable[[str], None], log_interval: int, input_progress: Optional[InputProgress] = None,
                 min_seconds: float = PROGRESS_MIN_SECONDS) -> None:
        self.emit = emit
        self.log_interval = max(1, log_interval)
        self.input_progress = input_progress
        self.min_seconds = min_seconds
        self.start = time.time()
        self._last_time: Optional[float] = None
        self._last_documents = 0

    def update(self, documents: int, n_bytes: int) -> None:
        """documents written and input bytes (decompressed) processed so far."""
        now = time.time()
        if documents - self._last_documents < self.log_interval:
            return
        if self._last_time is not None and now - self._last_time < self.min_seconds:
            return
        self._last_time, self._last_documents = now, documents
        elapsed = now - self.start
        line = (f"Processed {documents:,} documents, {n_bytes / 2**20:,.2f} MB "
                f"({format_rate(documents, n_bytes, elapsed)})")
        if self.input_progress is not None and self.input_progress.total_bytes:
            fraction = self.input_progress.fraction()
            line += f"; {100 * fraction:.1f}% of the input"
            if fraction > 0:
                line += f", ETA {format_duration(elapsed * (1 - fraction) / fraction)}"
        self.emit(line)


def bad_input_lines(bad: Counter, examples: Dict[str, List[str]]) -> List[str]:
    """One line per kind of bad input: count, what was done, the first line numbers."""
    lines = []
    for reason, count in sorted(bad.items()):
        shown = examples.get(reason, [])
        action = "kept as empty documents" if reason in KEPT_REASONS else "skipped"
        more = f" (and {count - len(shown):,} more)" if count > len(shown) else ""
        lines.append(f"Bad input: {count:,} line{'s' if count != 1 else ''} {action}, "
                     f"{BAD_INPUT_REASONS[reason]}: first at {', '.join(shown)}{more}")
    return lines


def summary_lines(result, elapsed: float, show_domains: bool, failed: bool = False, strict: bool = False) -> List[str]:
    """The end-of-run report of a preprocess.PreprocessResult."""
    if failed:
        lines = [f"FAILED after {elapsed:.1f} s; no output dataset was written (temporary files removed)"]
    else:
        lines = [f"Done in {elapsed:.1f} s: {result.documents:,} documents, {result.sequences:,} sequences, "
                 f"{result.tokens:,} tokens from {result.bytes / 2**20:.2f} MB "
                 f"({format_rate(result.documents, result.bytes, elapsed)})"]
        lines += [f"  wrote {prefix}.bin/.idx" for _, prefix in sorted(result.outputs.items())]
        if show_domains:
            lines += [f"  {domain}: {n:,} documents"
                      for domain, n in sorted(result.domain_documents.items(), key=lambda kv: str(kv[0]))
                      if domain is not None]
    if result.filtered:
        lines.append(f"Filtered out by --pile-domains: {result.filtered:,} documents")
    if not (failed and strict):  # with --strict the error itself names the bad line
        lines += bad_input_lines(result.bad, result.bad_examples)
    return lines
