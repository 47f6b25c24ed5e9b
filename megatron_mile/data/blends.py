"""Where a run's samples come from, with Megatron-LM's data-source flags: one blend split by --split
(--data-path, or --data-args-path: a text file holding the --data-path value), or one blend per split
(--train-data-path, --valid-data-path, --test-data-path, or --per-split-data-args-path: a JSON file
{"train": ..., "valid": ..., "test": ...} of such lists), or --mock-data. Megatron-LM's rules: at most one
source; --data-path and --data-args-path exclusive, the per-split paths and their JSON file exclusive, and
--split only with one blend (megatron-core's BlendedMegatronDatasetConfig asserts it).

The files are data a user hands over: read as UTF-8 text with a size limit, every problem reported as one
DataSourceError naming the flag and the file. Nothing here imports torch or megatron.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron_mile.data.splits import DataSplitError, parse_blend

# A blend list of tens of thousands of prefixes is a few MB; anything far larger is not a blend file.
MAX_DATA_ARGS_BYTES = 64 * 1024 * 1024
PER_SPLIT_KEYS = ("train", "valid", "test")
PER_SPLIT_FLAGS = ("--train-data-path", "--valid-data-path", "--test-data-path")

Blend = Tuple[List[str], Optional[List[float]]]  # megatron-core's (prefixes, weights or None)


class DataSourceError(ValueError):
    """A data-source file that cannot be read as its flag requires; the message names the flag and the file."""


@dataclass
class DataSources:
    """The run's blends, as megatron-core's dataset config takes them: `blend` (split by --split) or
    `blend_per_split` ([train, valid, test], each a Blend or None); both None with --mock-data."""

    blend: Optional[Blend] = None
    blend_per_split: Optional[List[Optional[Blend]]] = None

    def prefixes(self) -> List[str]:
        """Every dataset prefix the run reads, once each, in order."""
        blends = [self.blend] if self.blend else [b for b in self.blend_per_split or [] if b]
        seen: List[str] = []
        for prefixes, _ in blends:
            seen += [p for p in prefixes if p not in seen]
        return seen


def _read_text(path: str, flag: str) -> str:
    """The file's text (UTF-8), refusing what is not a readable regular file of at most MAX_DATA_ARGS_BYTES."""
    try:
        size = os.path.getsize(path)
        if not os.path.isfile(path):
            raise DataSourceError(f"{flag} {path}: not a regular file")
        if size > MAX_DATA_ARGS_BYTES:
            raise DataSourceError(f"{flag} {path}: {size:,} bytes, more than the {MAX_DATA_ARGS_BYTES:,} a blend "
                                  "file may hold; is it the right file?")
        with open(path, "rb") as handle:
            data = handle.read(MAX_DATA_ARGS_BYTES + 1)
    except OSError as error:
        raise DataSourceError(f"{flag} {path}: cannot be read ({error.strerror or error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataSourceError(f"{flag} {path}: not UTF-8 text (byte {error.start}); give a text file") from None


def read_data_args(path: str) -> List[str]:
    """The --data-path value held by the --data-args-path file: whitespace-separated entries, as Megatron-LM
    reads it. Raises DataSourceError (unreadable, too large, not text, or empty)."""
    entries = _read_text(path, "--data-args-path").split()
    if not entries:
        raise DataSourceError(f"--data-args-path {path}: the file is empty; it should hold the --data-path value "
                              "('prefix' or 'w1 prefix1 w2 prefix2 ...')")
    return entries


def read_per_split_data_args(path: str) -> List[Optional[List[str]]]:
    """[train, valid, test] --*-data-path values from the --per-split-data-args-path JSON file: an object
    whose keys are among "train", "valid", "test", each a list of strings or one whitespace-separated string
    (as Megatron-LM reads it) or null; a missing key is a split without data.

    Raises DataSourceError (unreadable, not JSON, unknown keys, values of another type).
    """
    flag = "--per-split-data-args-path"
    try:
        values = json.loads(_read_text(path, flag))
    except json.JSONDecodeError as error:
        raise DataSourceError(f"{flag} {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(values, dict):
        raise DataSourceError(f'{flag} {path}: expected a JSON object {{"train": [...], "valid": [...], '
                              f'"test": [...]}}, got a {type(values).__name__}')
    unknown = sorted(set(values) - set(PER_SPLIT_KEYS))
    if unknown:
        raise DataSourceError(f"{flag} {path}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                              "'train', 'valid' and 'test'")
    lists: List[Optional[List[str]]] = []
    for key in PER_SPLIT_KEYS:
        value = values.get(key)
        if isinstance(value, str):
            value = value.split()
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DataSourceError(f"{flag} {path}: {key!r} must be a list of strings ('prefix' or 'weight', "
                                  "'prefix' entries), one string of them, or null")
        lists.append(value or None)
    return lists


def _blend(entries: Optional[Sequence[str]], flag: str) -> Optional[Blend]:
    return parse_blend(entries, flag) if entries else None


def resolve_sources(data_path, data_args_path, train_data_path, valid_data_path, test_data_path,
                    per_split_data_args_path) -> DataSources:
    """The blends the data-source flags name (the files read). Call after source_flag_problems found none.

    Raises DataSourceError (a file) or DataSplitError (a blend's weights).
    """
    if data_args_path is not None:
        return DataSources(blend=_blend(read_data_args(data_args_path), "--data-args-path"))
    if data_path:
        return DataSources(blend=_blend(data_path, "--data-path"))
    if per_split_data_args_path is not None:
        lists = read_per_split_data_args(per_split_data_args_path)
        flags = [f"{per_split_data_args_path} {key!r}" for key in PER_SPLIT_KEYS]
    else:
        lists, flags = [train_data_path, valid_data_path, test_data_path], list(PER_SPLIT_FLAGS)
    if any(lists):
        return DataSources(blend_per_split=[_blend(entries, flag) for entries, flag in zip(lists, flags)])
    return DataSources()


def source_flag_problems(d, eval_iters: int) -> List[str]:
    """The data-source flags' conflicts as Megatron-LM checks them, plus what this trainer needs (training
    data, validation data when it evaluates). `d`: the run's DataConfig (finalized). Reads the blend files."""
    per_split_given = [flag for flag, value in zip(PER_SPLIT_FLAGS, (d.train_data_path, d.valid_data_path,
                                                                     d.test_data_path)) if value]
    problems = []
    if d.data_path and d.data_args_path is not None:
        problems.append("give one of --data-path or --data-args-path (a file holding the --data-path value)")
    if per_split_given and d.per_split_data_args_path is not None:
        problems.append(f"give one of {', '.join(per_split_given)} or --per-split-data-args-path (a JSON file "
                        "holding them)")
    sources = [name for name, used in (
        ("--mock-data", d.mock_data), ("--data-path / --data-args-path", d.data_path or d.data_args_path),
        ("--train/valid/test-data-path / --per-split-data-args-path",
         per_split_given or d.per_split_data_args_path)) if used]
    if len(sources) != 1:
        got = f"; got {' and '.join(sources)}" if sources else ""
        problems.append("give exactly one data source: --data-path (prepared .bin/.idx prefixes, split by "
                        "--split), --data-args-path, --train-data-path with --valid-data-path (one blend per split), "
                        "--per-split-data-args-path, or --mock-data" + got)
    if problems:
        return problems
    try:
        resolved = resolve_sources(d.data_path, d.data_args_path, d.train_data_path, d.valid_data_path,
                                   d.test_data_path, d.per_split_data_args_path)
    except (DataSourceError, DataSplitError) as error:
        return [str(error)]
    if resolved.blend_per_split is not None:
        train, valid, _ = resolved.blend_per_split
        if d.split is not None:
            problems.append(f"--split {d.split!r} applies to --data-path only; with one blend per split "
                            "(--train-data-path, ...) drop it")
        if train is None:
            problems.append("one blend per split needs training data: add --train-data-path (or a 'train' list in "
                            "--per-split-data-args-path)")
        if valid is None and eval_iters > 0:
            problems.append(f"--eval-iters {eval_iters} evaluates on validation data: add --valid-data-path (or a "
                            "'valid' list in --per-split-data-args-path), or set --eval-iters 0")
    return problems
