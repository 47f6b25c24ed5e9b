"""Concatenate Megatron indexed datasets into one, as Megatron-LM's tools/merge_datasets.py does, atomically."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from megatron_mile.data.indexed_reader import IndexedDatasetError, check_indexed_dataset
from megatron_mile.data.indexed_writer import IndexedDatasetWriter


class MergeError(ValueError):
    """The datasets cannot be merged; the message names the file at fault."""


def find_prefixes(directory: str, names: Optional[Sequence[str]] = None) -> List[str]:
    """Dataset prefixes to merge from ``directory``.

    Without ``names``: every ``X.bin``/``X.idx`` pair, sorted by name (Megatron-LM's order). With
    ``names``: those prefixes, in the given order (a name is looked up inside ``directory`` unless it is a
    path that exists as given).

    Raises:
        MergeError: not a directory, a half pair, a named dataset missing, or nothing to merge.
    """
    if not os.path.isdir(directory):
        raise MergeError(f"--input {directory!r} is not a directory")
    if names:
        prefixes = []
        for name in names:
            name = name[:-4] if name.endswith((".bin", ".idx")) else name
            candidate = name if os.path.isfile(name + ".idx") else os.path.join(directory, name)
            for ext in (".bin", ".idx"):
                if not os.path.isfile(candidate + ext):
                    raise MergeError(f"--prefixes {name!r}: {candidate + ext} does not exist")
            prefixes.append(candidate)
        return prefixes
    stems = {}
    for entry in os.listdir(directory):
        stem, ext = os.path.splitext(entry)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(directory, entry)):
            stems.setdefault(stem, set()).add(ext)
    for stem, exts in sorted(stems.items()):
        if exts != {".bin", ".idx"}:
            (have,) = exts
            lacking = ".idx" if have == ".bin" else ".bin"
            raise MergeError(f"{os.path.join(directory, stem)}{have} has no matching {lacking}")
    if not stems:
        raise MergeError(f"--input {directory!r} holds no .bin/.idx dataset")
    return [os.path.join(directory, stem) for stem in sorted(stems)]


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> IndexedDatasetWriter:
    """Write the concatenation of ``prefixes`` to ``output_prefix``; returns the finalized writer.

    Every input is validated (indexed_reader.check_indexed_dataset) before anything is written.

    Raises:
        MergeError: no input, the output is an input, an input is damaged, or the dtypes differ.
    """
    if not prefixes:
        raise MergeError("nothing to merge")
    out_abs = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out_abs for p in prefixes):
        raise MergeError(f"--output-prefix {output_prefix!r} is one of the inputs; choose another name")
    try:
        # One at a time: each validated index holds a memory map (and a file descriptor) while referenced.
        dtypes = [check_indexed_dataset(prefix).dtype for prefix in prefixes]
    except IndexedDatasetError as err:
        raise MergeError(str(err)) from err
    dtype = dtypes[0]
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in prefixes:
            try:
                writer.append_dataset(prefix)
            except ValueError as err:
                raise MergeError(str(err)) from err
        writer.finalize()
    return writer
