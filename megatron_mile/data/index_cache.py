"""megatron-core's dataset index caches are data, never code: refuse any cache file it would unpickle.

megatron-core's GPTDataset and BlendedDataset save their document / sample / shuffle indices as ``.npy``
files and read them back with ``numpy.load(path, allow_pickle=True, mmap_mode="r")``. For a real ``.npy``
holding plain numbers that maps the file; for anything else numpy falls back to ``pickle.load``, which runs
whatever code the file names. Without ``--data-cache-path`` the caches live inside the dataset's own
directory (``{prefix}/cache/GPTDataset_indices/``), so a dataset someone shares or a user downloads would
run code on every rank that opens it. ``check_index_caches`` runs on each rank just before megatron opens
the caches: every ``.npy`` file in the cache directories must be a plain ``.npy`` array, which is decided
from its header alone (numpy.lib.format parses it as a Python literal, never with pickle).
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional

import numpy as np
from numpy.lib import format as npy_format

# npy header readers by format version; 3.0 only adds UTF-8 field names, which megatron never writes.
_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


class IndexCacheError(ValueError):
    """A dataset index cache file that is not a plain .npy array; the message names it."""


def index_cache_directories(prefixes: Iterable[str], data_cache_path: Optional[str]) -> List[str]:
    """Where megatron-core reads and writes the index caches of these datasets: --data-cache-path when
    given (for GPT and blended datasets alike), else ``{prefix}/cache/<dataset class>_indices`` per dataset,
    whatever the class (all of ``{prefix}/cache``'s subdirectories)."""
    if data_cache_path:
        return [data_cache_path]
    directories = []
    for prefix in prefixes:
        root = os.path.join(prefix, "cache")
        if os.path.isdir(root):
            directories.append(root)
            directories += sorted(os.path.join(root, d) for d in os.listdir(root)
                                  if os.path.isdir(os.path.join(root, d)))
    return directories


def check_plain_npy(path: str) -> None:
    """Raise IndexCacheError unless `path` is a .npy array file whose dtype holds no Python objects.

    Only the magic string and the header are read; nothing is unpickled.
    """
    why = "megatron-core would unpickle it, which runs any code it holds"
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
        except ValueError:
            raise IndexCacheError(f"dataset index cache {path} is not a .npy array file (a pickle or other data): "
                                  f"{why}. Delete it (megatron rebuilds its caches) and find out where it came "
                                  "from") from None
        reader = _HEADER_READERS.get(version)
        if reader is None:
            raise IndexCacheError(f"dataset index cache {path} has .npy format version {version[0]}.{version[1]}, "
                                  "which megatron never writes: delete it (megatron rebuilds its caches)")
        try:
            _, _, dtype = reader(f)
        except (ValueError, TypeError, SyntaxError) as err:
            raise IndexCacheError(f"dataset index cache {path} has an unreadable .npy header ({err}): delete it "
                                  "(megatron rebuilds its caches)") from None
    if np.dtype(dtype).hasobject:
        raise IndexCacheError(f"dataset index cache {path} holds Python objects (dtype {dtype}), not indices: {why}. "
                              "Delete it (megatron rebuilds its caches) and find out where it came from")


def check_index_caches(prefixes: Iterable[str], data_cache_path: Optional[str]) -> None:
    """check_plain_npy on every .npy file of the index-cache directories of these datasets. No collectives.

    Raises:
        IndexCacheError: naming the first file that is not a plain .npy array.
    """
    for directory in index_cache_directories(prefixes, data_cache_path):
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.endswith(".npy") and os.path.isfile(path):
                check_plain_npy(path)
