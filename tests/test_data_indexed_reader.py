"""Validation of .bin/.idx pairs before megatron opens them: every field of a good dataset (written with the
project's writer, read back by megatron-core) is corrupted in turn, and each damaged pair must be refused
with the damaged file named, by the checks training, evaluation and merging run."""

import os
import struct

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_mile.data import indexed_reader
from megatron_mile.data.cli import merge_main
from megatron_mile.data.indexed_reader import IndexedDatasetError, check_indexed_dataset, read_index
from megatron_mile.data.indexed_writer import IndexedDatasetWriter
from megatron_mile.training.data import check_dataset_files

DOCS = [[5, 6, 7], [], [8], [9, 10, 11, 12, 13], [1, 2], [], [3, 4, 5, 6]]
N_SEQ = sum(1 for d in DOCS if d)  # 5 sequences (empty documents have none)
N_DOC_ENTRIES = len(DOCS) + 1
LENGTHS_AT = 34
POINTERS_AT = LENGTHS_AT + 4 * N_SEQ
DOC_INDEX_AT = POINTERS_AT + 8 * N_SEQ


def _write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for ids in docs:
            writer.add_document(ids)
        writer.finalize()
    return prefix


def _patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _append(path, data):
    with open(path, "ab") as f:
        f.write(data)


def _is_memory_mapped(array):
    while array is not None and not isinstance(array, np.memmap):
        array = getattr(array, "base", None)
    return array is not None


# (corruption, which file the message must name, words it must hold)
CORRUPTIONS = {
    "magic": (lambda p: _patch(p + ".idx", 0, "<9s", b"NOTANIDX\x00"), ".idx", "magic"),
    "short_header": (lambda p: _truncate(p + ".idx", 20), ".idx", "truncated header"),
    "version": (lambda p: _patch(p + ".idx", 9, "<Q", 2), ".idx", "version 2"),
    "unknown_dtype_code": (lambda p: _patch(p + ".idx", 17, "<B", 99), ".idx", "dtype code 99"),
    "dtype_code_disagrees_with_bin": (lambda p: _patch(p + ".idx", 17, "<B", 4), ".idx", "disagrees"),
    "sequence_count": (lambda p: _patch(p + ".idx", 18, "<Q", N_SEQ + 1), ".idx", "announces"),
    "huge_sequence_count": (lambda p: _patch(p + ".idx", 18, "<Q", 2**62), ".idx", "announces"),
    "document_count": (lambda p: _patch(p + ".idx", 26, "<Q", N_DOC_ENTRIES - 1), ".idx", "announces"),
    "negative_length": (lambda p: _patch(p + ".idx", LENGTHS_AT + 4 * 2, "<i", -3), ".idx", "negative length"),
    "pointer_past_bin_end": (lambda p: _patch(p + ".idx", POINTERS_AT + 8 * 4, "<q", 10**6), ".idx", "byte 1000000"),
    "negative_pointer": (lambda p: _patch(p + ".idx", POINTERS_AT + 8 * 1, "<q", -8), ".idx", "negative offset"),
    "pointers_out_of_order": (lambda p: _patch(p + ".idx", POINTERS_AT + 8 * 3, "<q", 2), ".idx", "sequence 3"),
    # Lengths and offsets agree with each other, but not with the .bin: the last sequence runs past its end.
    "last_length_past_bin_end": (lambda p: _patch(p + ".idx", LENGTHS_AT + 4 * (N_SEQ - 1), "<i", 5), ".bin",
                                 "truncated"),
    "document_index_start": (lambda p: _patch(p + ".idx", DOC_INDEX_AT, "<q", 1), ".idx", "starts at 1"),
    "document_index_end": (lambda p: _patch(p + ".idx", DOC_INDEX_AT + 8 * (N_DOC_ENTRIES - 1), "<q", N_SEQ - 1),
                           ".idx", f"holds {N_SEQ} sequences"),
    "document_index_backwards": (lambda p: _patch(p + ".idx", DOC_INDEX_AT + 8 * 3, "<q", 0), ".idx",
                                 "entry 3 (0) is smaller"),
    "truncated_bin": (lambda p: _truncate(p + ".bin", 2 * 10), ".bin", "truncated"),
    "bin_longer_than_index": (lambda p: _append(p + ".bin", b"\x00\x00" * 3), ".bin", "longer"),
    "bin_not_whole_tokens": (lambda p: _append(p + ".bin", b"\x00"), ".bin", "whole number"),
}


def test_a_good_dataset_is_accepted_and_read_as_megatron_reads_it(tmp_path):
    prefix = _write(str(tmp_path / "good"))
    index = check_indexed_dataset(prefix)
    reference = IndexedDataset(prefix)
    assert index.dtype == np.uint16
    assert index.sequence_lengths.tolist() == reference.sequence_lengths.tolist() == [3, 1, 5, 2, 4]
    assert index.sequence_pointers.tolist() == reference.index.sequence_pointers.tolist()
    assert index.document_indices.tolist() == reference.document_indices.tolist()
    assert (index.num_sequences, index.num_documents) == (N_SEQ, len(DOCS))
    assert all(_is_memory_mapped(a) for a in index[1:])  # views of the file, not copies in memory
    assert check_dataset_files([prefix, prefix]) == [N_SEQ, N_SEQ]


def test_an_empty_dataset_is_valid(tmp_path):
    prefix = _write(str(tmp_path / "empty"), docs=[[], []])
    assert check_indexed_dataset(prefix).num_sequences == 0


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_refused_naming_the_file(name, tmp_path):
    corrupt, damaged, words = CORRUPTIONS[name]
    prefix = _write(str(tmp_path / "data"))
    corrupt(prefix)
    with pytest.raises(IndexedDatasetError) as refused:
        check_dataset_files([prefix])  # what training and evaluation run before megatron opens the data
    message = str(refused.value)
    assert message.startswith(prefix + damaged + ":"), message
    assert words in message, message


@pytest.mark.parametrize("chunk", [2, 3, 1 << 22])
def test_checks_span_chunk_boundaries(chunk, tmp_path, monkeypatch):
    """The vectorised checks run in bounded chunks: a fault in a later chunk is still found."""
    monkeypatch.setattr(indexed_reader, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=int(n)).tolist() for n in rng.integers(0, 9, size=40)]
    prefix = _write(str(tmp_path / "many"), docs=docs)
    index = read_index(prefix)
    assert index.sequence_lengths.tolist() == IndexedDataset(prefix).sequence_lengths.tolist()
    n_seq = index.num_sequences
    pointers_at = 34 + 4 * n_seq
    last = int(index.sequence_pointers[-1])
    del index
    _patch(prefix + ".idx", pointers_at + 8 * (n_seq - 1), "<q", last + 2)
    with pytest.raises(IndexedDatasetError, match=f"sequence {n_seq - 1} starts at byte {last + 2}"):
        check_indexed_dataset(prefix)


def test_a_missing_file_names_the_flag(tmp_path):
    prefix = _write(str(tmp_path / "data"))
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match="--valid-data-path prefix .*data.bin"):
        check_dataset_files([prefix], "--valid-data-path")


@pytest.mark.parametrize("name", ["dtype_code_disagrees_with_bin", "truncated_bin", "negative_length"])
def test_merge_refuses_a_damaged_input_and_writes_nothing(name, tmp_path, capsys):
    corrupt, damaged, _ = CORRUPTIONS[name]
    parts = tmp_path / "parts"
    parts.mkdir()
    _write(str(parts / "a"))
    corrupt(_write(str(parts / "b")))
    assert merge_main(["--input", str(parts), "--output-prefix", str(tmp_path / "merged")]) == 1
    assert f"{parts / 'b'}{damaged}:" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "merged.bin") and not os.path.exists(tmp_path / "merged.idx")
