"""Read and validate Megatron's indexed dataset (``{prefix}.idx`` / ``{prefix}.bin``) with numpy alone.

megatron-core's IndexedDataset trusts its files: it believes the counts in the ``.idx`` header, never
compares the byte offsets with the sequence lengths or the dtype, and never looks at the size of the
``.bin``. A damaged or mismatched pair then trains on garbage, or fails at some later batch without
naming the file. ``check_indexed_dataset`` is run on every dataset before megatron opens it (training,
evaluation, merging): it either returns the validated index or raises ``IndexedDatasetError`` naming the
file and what is wrong with it.

On-disk format (written by indexed_writer.py and by Megatron-LM):

    magic b"MMIDIDX\\x00\\x00" | version <Q = 1 | dtype code <B | sequence count <Q | document-index length <Q
    | int32 sequence lengths | int64 byte offset of each sequence in .bin | int64 document index

The checks are cheap: the ``.idx`` is memory-mapped (nothing is read before the header's counts have
been checked against the file size) and the arrays are compared in vectorised chunks of bounded size.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple, Optional

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index length
HEADER_BYTES = _HEADER.size  # 34
# Megatron's DType codes.
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

# Elements per vectorised comparison: bounds the temporaries (a few int64 arrays of this length) whatever
# the dataset size.
_CHUNK = 1 << 22
_REWRITE_HINT = "re-create the dataset with tools/preprocess_data.py (or restore the original files)"


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is not a valid Megatron indexed dataset; the message names the file."""


class DatasetIndex(NamedTuple):
    """A validated ``.idx``; the arrays are read-only views of its memory map."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [sequences], tokens per sequence
    sequence_pointers: np.ndarray  # int64 [sequences], byte offset of each sequence in .bin
    document_indices: np.ndarray  # int64 [documents + 1], first sequence of each document, then the count

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1


def _fail(path: str, problem: str) -> IndexedDatasetError:
    return IndexedDatasetError(f"{path}: {problem}; {_REWRITE_HINT}")


def read_index(prefix: str) -> DatasetIndex:
    """Read and validate ``{prefix}.idx`` on its own (the ``.bin`` is not opened).

    Checked: magic, version, dtype code, header counts against the file size, sequence lengths >= 0,
    byte offsets = running sum of the lengths times the token size, document index from 0 to the
    sequence count without going backwards. No collectives.

    Raises:
        FileNotFoundError: no ``{prefix}.idx``.
        IndexedDatasetError: anything else, naming the file and the first problem found.
    """
    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < len(INDEX_MAGIC) or header[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise _fail(path, "not a Megatron indexed-dataset index (bad magic bytes)")
    if len(header) < HEADER_BYTES:
        raise _fail(path, f"truncated header ({size} bytes, the header alone takes {HEADER_BYTES})")
    _, version, code, n_seq, n_doc = _HEADER.unpack(header)
    if version != INDEX_VERSION:
        raise _fail(path, f"index format version {version}; only version {INDEX_VERSION} exists")
    if code not in CODE_DTYPES:
        raise _fail(path, f"unknown token dtype code {code} (known: {sorted(CODE_DTYPES)})")
    dtype = CODE_DTYPES[code]
    # The counts are checked against the file size before anything is read or allocated from them.
    expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if size != expected:
        raise _fail(path, f"the header announces {n_seq} sequences and {n_doc} document-index entries, which "
                          f"take {expected} bytes, but the file has {size} bytes")
    if n_doc < 1:
        raise _fail(path, "the document index is empty (it must start with 0 and end with the sequence count)")

    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(buffer, dtype="<i4", count=n_seq, offset=HEADER_BYTES)
    pointers = np.frombuffer(buffer, dtype="<i8", count=n_seq, offset=HEADER_BYTES + 4 * n_seq)
    doc_index = np.frombuffer(buffer, dtype="<i8", count=n_doc, offset=HEADER_BYTES + 12 * n_seq)
    _check_lengths_and_pointers(path, dtype, lengths, pointers)
    _check_document_index(path, doc_index, n_seq)
    return DatasetIndex(dtype, lengths, pointers, doc_index)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _check_lengths_and_pointers(path: str, dtype: np.dtype, lengths: np.ndarray, pointers: np.ndarray) -> None:
    """Lengths >= 0 and pointer[i] == itemsize * sum(lengths[:i]), chunk by chunk."""
    itemsize = dtype.itemsize
    tokens_before = 0
    for start in range(0, lengths.shape[0], _CHUNK):
        chunk = lengths[start:start + _CHUNK].astype(np.int64)
        if (chunk < 0).any():
            i = start + _first(chunk < 0)
            raise _fail(path, f"sequence {i} has a negative length ({int(lengths[i])})")
        ends = tokens_before + np.cumsum(chunk)  # tokens up to and including each sequence
        expected = (ends - chunk) * itemsize
        actual = pointers[start:start + _CHUNK]
        wrong = actual != expected
        if wrong.any():
            i = _first(wrong)
            raise _fail(path, _pointer_problem(start + i, int(actual[i]), int(expected[i]), dtype,
                                               int(ends[i] - chunk[i])))
        tokens_before = int(ends[-1])


def _pointer_problem(index: int, actual: int, expected: int, dtype: np.dtype, tokens_before: int) -> str:
    message = (f"sequence {index} starts at byte {actual} of the .bin, but the {tokens_before} tokens before it "
               f"take {expected} bytes as {dtype.name}")
    if actual < 0:
        return message + " (a negative offset)"
    if tokens_before and actual % tokens_before == 0 and actual // tokens_before in (1, 2, 4, 8):
        other = actual // tokens_before
        if other != dtype.itemsize:
            return (message + f": the offsets fit {other}-byte tokens, so the dtype code ({dtype.name}, "
                              f"{dtype.itemsize} bytes) disagrees with the data")
    return message + ": the offsets are not those of the sequences stored back to back"


def _check_document_index(path: str, doc_index: np.ndarray, n_seq: int) -> None:
    if int(doc_index[0]) != 0:
        raise _fail(path, f"the document index starts at {int(doc_index[0])} instead of 0")
    if int(doc_index[-1]) != n_seq:
        raise _fail(path, f"the document index ends at sequence {int(doc_index[-1])}, but the index holds "
                          f"{n_seq} sequences")
    previous = 0
    for start in range(0, doc_index.shape[0], _CHUNK):
        chunk = doc_index[start:start + _CHUNK]
        steps = np.diff(chunk, prepend=previous)
        if (steps < 0).any():
            i = start + _first(steps < 0)
            raise _fail(path, f"document-index entry {i} ({int(doc_index[i])}) is smaller than the entry before it")
        previous = int(chunk[-1])


def check_indexed_dataset(prefix: str, flag: Optional[str] = None) -> DatasetIndex:
    """Validate ``{prefix}.idx`` (read_index) and its ``{prefix}.bin``: the .bin must hold exactly the
    tokens the index describes (a whole number of tokens of the index's dtype, none missing, none extra).

    flag: the command-line flag the prefix came from, named when a file is missing. No collectives.

    Raises:
        FileNotFoundError: ``.bin`` or ``.idx`` missing.
        IndexedDatasetError: the files are damaged or do not belong together (message names the file).
    """
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        source = f"{flag} prefix" if flag else "dataset prefix"
        raise FileNotFoundError(f"{source} {prefix!r} has no {' / '.join(missing)}: give the prefix that "
                                "tools/preprocess_data.py printed (without .bin/.idx)")
    index = read_index(prefix)
    bin_path = prefix + ".bin"
    bin_size = os.path.getsize(bin_path)
    itemsize = index.dtype.itemsize
    tokens = int(index.sequence_lengths.sum(dtype=np.int64))
    if bin_size % itemsize:
        raise _fail(bin_path, f"{bin_size} bytes is not a whole number of {index.dtype.name} tokens "
                              f"({itemsize} bytes each, the dtype {prefix}.idx names)")
    if bin_size != tokens * itemsize:
        what = "truncated" if bin_size < tokens * itemsize else "longer than its index says"
        raise _fail(bin_path, f"{what}: {prefix}.idx describes {tokens} {index.dtype.name} tokens "
                              f"({tokens * itemsize} bytes), the file has {bin_size} bytes "
                              f"({bin_size // itemsize} tokens); the .bin and .idx do not belong together")
    return index
