"""Write Megatron's indexed dataset with numpy alone, atomically (indexed_reader.py reads and validates it).

megatron.core.datasets.indexed_dataset imports torch, which costs seconds per process; the preprocessing
tool writes the same bytes with numpy instead, and tests/test_data_indexed_writer.py checks byte-identity
against megatron-core's IndexedDatasetBuilder.

On-disk format: ``{prefix}.bin`` holds the tokens back to back; ``{prefix}.idx`` is laid out as
indexed_reader.py describes.

Atomicity (megatron_mile.atomic_io): both files are written under temporary names beside the target and
each is renamed after it is flushed to disk, ``.bin`` first and ``.idx`` last, after removing any old
``.idx``. An interrupted run therefore never leaves a ``.bin``/``.idx`` pair that looks valid but is not.
"""

from __future__ import annotations

import os
import shutil
import struct
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_mile.atomic_io import AtomicFile
from megatron_mile.data.indexed_reader import DTYPE_CODES, INDEX_MAGIC, INDEX_VERSION, check_indexed_dataset


def dtype_for_vocab(vocab_size: Optional[int]) -> np.dtype:
    """Megatron's choice of token dtype: uint16 below 65,500 entries, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


class IndexedDatasetWriter:
    """Stream documents into ``{prefix}.bin``/``.idx``; use as a context manager so that an error
    removes the temporary files instead of leaving them behind."""

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} cannot be stored in a Megatron indexed dataset")
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"output directory {directory!r} does not exist; create it first")
        self._pending_bin = AtomicFile(prefix + ".bin")
        self._pending_idx: Optional[AtomicFile] = None
        self._bin = open(self._pending_bin.path, "wb")
        self._lengths: List[np.ndarray] = []  # int32 per sequence
        self._doc_ends: List[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()

    def add_batch(self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray) -> None:
        """Append several documents at once.

        Args:
            tokens: all tokens of the batch, back to back, already in ``self.dtype``.
            sequence_lengths: tokens per sequence (a sequence is a document, or a sentence).
            sequences_per_document: sequences per document; 0 for a document without tokens, which
                still gets its document-index entry, as Megatron-LM writes it.
        """
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(memoryview(tokens).cast("B"))
        lengths = np.asarray(sequence_lengths, dtype=np.int32)
        self._lengths.append(lengths)
        ends = self.num_sequences + np.cumsum(np.asarray(sequences_per_document, dtype=np.int64))
        self._doc_ends.append(ends)
        self.num_sequences += int(lengths.size)
        self.num_documents += int(ends.size)
        self.num_tokens += int(tokens.size)

    def add_document(self, ids: Sequence[int], lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document; ``lengths`` splits it into sequences (default: one sequence, or none
        when ``ids`` is empty)."""
        if lengths is None:
            lengths = [len(ids)] if len(ids) else []
        self.add_batch(np.asarray(ids, dtype=self.dtype), np.asarray(lengths, dtype=np.int32),
                       np.asarray([len(lengths)]))

    def append_dataset(self, prefix: str) -> None:
        """Append every document of the existing dataset ``prefix`` (same dtype required).

        Raises:
            IndexedDatasetError: ``prefix`` is not a valid dataset (indexed_reader.check_indexed_dataset).
            ValueError: its dtype differs from the output's.
        """
        dtype, lengths, _, doc_index = check_indexed_dataset(prefix)
        if dtype != self.dtype:
            raise ValueError(f"{prefix}: dtype {dtype} differs from the output's {self.dtype}; "
                             "datasets tokenized with different vocabulary sizes cannot be merged")
        with open(prefix + ".bin", "rb") as src:
            shutil.copyfileobj(src, self._bin, 16 << 20)
        self._lengths.append(lengths)
        self._doc_ends.append(self.num_sequences + doc_index[1:])
        self.num_sequences += int(lengths.size)
        self.num_documents += int(doc_index.size - 1)
        self.num_tokens += int(lengths.sum(dtype=np.int64))

    def finalize(self) -> Tuple[str, str]:
        """Write the index and move both files into place; returns the (bin, idx) paths."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_index = np.concatenate(self._doc_ends)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        self._pending_idx = AtomicFile(self.prefix + ".idx")
        with open(self._pending_idx.path, "wb") as f:
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", doc_index.size))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_index.astype("<i8").tobytes())
        # An old .idx must go first: between the two renames a stale index would otherwise pair with
        # the new .bin and look like a valid dataset.
        bin_path, idx_path = self.prefix + ".bin", self.prefix + ".idx"
        if os.path.exists(idx_path):
            os.remove(idx_path)
        self._pending_bin.commit()
        self._pending_idx.commit()
        self._done = True
        return bin_path, idx_path

    def abort(self) -> None:
        """Close and delete the temporary files; the target paths are left untouched."""
        if not self._bin.closed:
            self._bin.close()
        for pending in (self._pending_bin, self._pending_idx):
            if pending is not None:
                pending.discard()
        self._done = True


def dataset_exists(prefix: str) -> bool:
    """Whether both ``{prefix}.bin`` and ``{prefix}.idx`` exist."""
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
