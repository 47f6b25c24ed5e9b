"""--split and the --data-path blend: parsed strictly, and each split's sequence range computed exactly as
megatron-core's dataset builder computes it, so that a split the run samples from is never empty.

Why: megatron-core 0.16 reads ``--split a,b`` as NaN proportions, turns ``--split 0,100,0`` into a missing
training dataset (a TypeError much later), stops on bad blend weights with bare AssertionErrors, and loops
forever in ``GPTDataset._get_num_epochs`` when asked for samples from a split that holds no token, which
any dataset under ~500 documents hits with the default 969,30,1 (its test split is empty), while the other
ranks wait in a barrier until the process-group timeout. Everything here is refused at start-up instead,
with one message naming the flag and a value that works.

The flag checks (``data_flag_problems``) import nothing heavy; the range arithmetic imports megatron-core's
own split helpers when first used.
"""

from __future__ import annotations

import math
import re
from typing import List, Mapping, Optional, Sequence, Tuple

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("training", "validation", "test")

# What megatron's parse_and_normalize_split reads from each field (it pulls [.0-9]+ out of the string);
# anything else in a field (a sign, an exponent, a letter) it would silently drop or misread.
_SPLIT_FIELD = re.compile(r"\d+(\.\d*)?|\.\d+")


class DataSplitError(ValueError):
    """A --split that leaves a split the run needs empty; the message names a split that works."""


def parse_split(split: str) -> List[float]:
    """The three proportions (training, validation, test) of a --split string, not normalised.

    Up to three comma-separated non-negative decimal numbers; missing ones are 0 (as in megatron). One pair
    of quotes around them is allowed: Megatron-LM's own launch scripts pass `'99,1,0'` with the quotes, which
    megatron-core reads as 99,1,0.

    Raises:
        DataSplitError: any other form, a non-finite number, or no training share.
    """
    text = str(split).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    fields = [f.strip() for f in text.split(",")]
    if not 1 <= len(fields) <= 3 or not all(_SPLIT_FIELD.fullmatch(f) for f in fields):
        raise DataSplitError(f"--split {split!r}: give up to three comma-separated non-negative numbers, the "
                             "training, validation and test proportions, e.g. --split 969,30,1")
    values = [float(f) for f in fields] + [0.0] * (3 - len(fields))
    if not all(math.isfinite(v) for v in values):
        raise DataSplitError(f"--split {split!r}: the proportions must be finite numbers, e.g. --split 969,30,1")
    if values[TRAIN] <= 0:
        raise DataSplitError(f"--split {split!r} gives the training split no share: the first number must be "
                             "> 0, e.g. --split 969,30,1")
    return values


def parse_blend(data_path: Sequence[str], flag: str = "--data-path") -> Tuple[List[str], Optional[List[float]]]:
    """(prefixes, weights or None) of a --data-path list, read as megatron's get_blend_from_list reads it:
    ``p1 p2 ...`` (odd length, or no entry at an even position is a number) or ``w1 p1 w2 p2 ...``.
    `flag`: what the messages call the list (--train-data-path, a file, ...).

    Raises:
        DataSplitError: weights mixed with bare prefixes, or a weight that is not a finite number > 0.
    """
    entries = [str(e) for e in data_path]
    if len(entries) % 2:
        return [e.strip() for e in entries], None
    candidates = entries[0::2]
    parsed = [_number(w) for w in candidates]
    if all(w is None for w in parsed):
        return [e.strip() for e in entries], None
    if any(w is None for w in parsed):
        raise DataSplitError(
            f"{flag} mixes weighted and unweighted datasets: give either prefixes only "
            "('p1 p2 ...') or a weight before every prefix ('w1 p1 w2 p2 ...')")
    prefixes = [p.strip() for p in entries[1::2]]
    for raw, weight, prefix in zip(candidates, parsed, prefixes):
        if not (math.isfinite(weight) and weight > 0):
            raise DataSplitError(f"{flag} weight {raw!r} of {prefix!r} must be a finite number > 0 "
                                 "(weights are relative sampling proportions)")
    return prefixes, parsed


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def data_flag_problems(data_path: Optional[Sequence[str]], split: str, eval_iters: int) -> List[str]:
    """The problems with --data-path, --split and --eval-iters together, for RunConfig.validate (no file
    is opened; the datasets themselves are checked when they are built)."""
    problems = []
    try:
        values = parse_split(split)
        if eval_iters > 0 and values[VALID] <= 0:
            problems.append(f"--split {split!r} gives the validation split no share, but --eval-iters "
                            f"{eval_iters} evaluates on it: give it one (e.g. --split 969,30,1) or set --eval-iters 0")
    except DataSplitError as error:
        problems.append(str(error))
    if data_path:
        try:
            parse_blend(data_path)
        except DataSplitError as error:
            problems.append(str(error))
    return problems


def split_matrix(split: str) -> List[Optional[Tuple[float, float]]]:
    """[(begin, end) fraction or None] per split, from megatron-core's own helpers (what GPTDatasetConfig
    stores as split_matrix). `split` is taken as given: check a user's flag with parse_split first."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def split_range(num_sequences: int, matrix, split_index: int) -> Tuple[int, int]:
    """Sequences [begin, end) of one split of a dataset of `num_sequences` sequences.

    BlendedMegatronDatasetBuilder._build_megatron_dataset_splits rounds each bound fraction times the
    sequence count (inline code, no function to call); this is that arithmetic. (0, 0) for a split
    without a share.
    """
    bounds = matrix[split_index]
    if bounds is None:
        return 0, 0
    return int(round(bounds[0] * float(num_sequences))), int(round(bounds[1] * float(num_sequences)))


def only_splits(matrix, needed: Sequence[int]) -> list:
    """The split matrix with every split the run does not sample from set to None, so that megatron does
    not build it (it builds every split with a share, even when asked for 0 samples, and an empty one never
    finishes). The other splits keep their ranges."""
    return [bounds if index in needed else None for index, bounds in enumerate(matrix)]


def _empty_splits(split: str, sequences: Mapping[str, int], needed: Sequence[int]):
    matrix = split_matrix(split)
    for prefix, count in sequences.items():
        for index in needed:
            begin, end = split_range(count, matrix, index)
            if end <= begin:
                yield prefix, count, index


def suggest_split(split: str, sequences: Mapping[str, int], needed: Sequence[int]) -> Optional[str]:
    """A --split under which no needed split of any dataset is empty, close to `split`; None if none can
    be (a dataset with fewer sequences than needed splits)."""
    values = parse_split(split)
    smallest = min(sequences.values())

    def fmt(*numbers):
        return ",".join(f"{n:g}" for n in numbers)

    candidates = [fmt(values[TRAIN], values[VALID], 0)]
    # In sequences of the smallest dataset: k of them for validation, the rest for training.
    candidates += [fmt(smallest - k, k, 0) for k in range(1, min(smallest, 1000))]
    if VALID not in needed:
        candidates.append("1,0,0")
    for candidate in candidates:
        if next(_empty_splits(candidate, sequences, needed), None) is None:
            return candidate
    return None


def check_splits_not_empty(split: str, sequences: Mapping[str, int], needed: Sequence[int]) -> None:
    """Refuse a --split that leaves a needed split of any dataset without a sequence.

    sequences: dataset prefix -> number of sequences (what megatron's GPT builder splits). needed: the
    split indices the run samples from (TRAIN, VALID, TEST). No collectives.

    Raises:
        DataSplitError: naming --split, the dataset, its size and a split that would work.
    """
    empty = next(_empty_splits(split, sequences, needed), None)
    if empty is None:
        return
    prefix, count, index = empty
    suggestion = suggest_split(split, sequences, needed)
    fix = (f"use e.g. --split {suggestion}" if suggestion is not None else
           "the dataset is too small to split: add data" + (", or set --eval-iters 0" if VALID in needed else ""))
    raise DataSplitError(
        f"--split {split!r} leaves the {SPLIT_NAMES[index]} split of {prefix} empty: the dataset holds "
        f"{count} sequences (documents) and the split's share of them rounds to none. Megatron cannot sample "
        f"from an empty split; {fix}")
