"""The numpy .bin/.idx writer and the merge tool against megatron-core's own IndexedDatasetBuilder."""

import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_mile.data.cli import merge_main
from megatron_mile.data.indexed_reader import read_index
from megatron_mile.data.indexed_writer import IndexedDatasetWriter, dtype_for_vocab


def _random_documents(rng, n_docs, vocab, sentences=False):
    docs = []
    for _ in range(n_docs):
        if rng.random() < 0.15:
            docs.append(([], []))  # an empty document: index entry, no sequence
            continue
        lengths = [int(x) for x in rng.integers(1, 40, size=rng.integers(1, 5) if sentences else 1)]
        docs.append((rng.integers(0, vocab, size=sum(lengths)).tolist(), lengths))
    return docs


def _megatron_build(prefix, docs, dtype):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids, lengths in docs:
        builder.add_document(ids, lengths)
    builder.finalize(prefix + ".idx")


def _bytes(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


@pytest.mark.parametrize("vocab", [1000, 65499, 65500, 200_000])
@pytest.mark.parametrize("sentences", [False, True])
def test_byte_identical_to_megatron_builder(tmp_path, vocab, sentences):
    rng = np.random.default_rng(vocab + sentences)
    docs = _random_documents(rng, 60, vocab, sentences)
    ref_dtype = DType.optimal_dtype(vocab)
    assert dtype_for_vocab(vocab) == np.dtype(ref_dtype)
    _megatron_build(str(tmp_path / "ref"), docs, ref_dtype)

    # Documents one by one and in uneven batches must give the same bytes.
    with IndexedDatasetWriter(str(tmp_path / "one"), dtype_for_vocab(vocab)) as w:
        for ids, lengths in docs:
            w.add_document(ids, lengths)
        w.finalize()
    with IndexedDatasetWriter(str(tmp_path / "batch"), dtype_for_vocab(vocab)) as w:
        for start, stop in [(0, 7), (7, 8), (8, 41), (41, 60)]:
            part = docs[start:stop]
            w.add_batch(np.array([t for ids, _ in part for t in ids], dtype=dtype_for_vocab(vocab)),
                        np.array([n for _, lengths in part for n in lengths]),
                        np.array([len(lengths) for _, lengths in part]))
        w.finalize()
    assert _bytes(str(tmp_path / "one")) == _bytes(str(tmp_path / "ref"))
    assert _bytes(str(tmp_path / "batch")) == _bytes(str(tmp_path / "ref"))
    ds = IndexedDataset(str(tmp_path / "batch"))
    non_empty = [ids for ids, _ in docs if ids]
    assert np.concatenate([ds[i] for i in range(len(ds))]).tolist() == [t for ids in non_empty for t in ids]


def test_read_index_matches_megatron(tmp_path):
    docs = _random_documents(np.random.default_rng(0), 30, 500, sentences=True)
    _megatron_build(str(tmp_path / "ref"), docs, np.uint16)
    dtype, lengths, pointers, doc_index = read_index(str(tmp_path / "ref"))
    ds = IndexedDataset(str(tmp_path / "ref"))
    assert dtype == np.uint16
    assert lengths.tolist() == ds.sequence_lengths.tolist()
    assert doc_index.tolist() == ds.document_indices.tolist()
    assert pointers.tolist() == ds.index.sequence_pointers.tolist()


def test_error_removes_temporaries_and_keeps_no_pair(tmp_path):
    prefix = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("simulated crash")
    assert os.listdir(tmp_path) == []


def test_crash_between_renames_leaves_no_valid_pair(tmp_path, monkeypatch):
    """A stale .idx from an earlier run must not pair with a new .bin if the final rename never happens."""
    from megatron_mile.data import indexed_writer

    prefix = str(tmp_path / "out")
    _megatron_build(prefix, [([5, 6], [2])], np.uint16)  # an earlier, complete dataset
    real_replace = os.replace

    def replace(src, dst):
        if dst.endswith(".idx"):
            raise KeyboardInterrupt("killed before the index was moved into place")
        return real_replace(src, dst)

    monkeypatch.setattr(indexed_writer.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 3, 4])
            w.finalize()
    assert not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx"))
    assert not IndexedDataset.exists(prefix)


def test_merge_matches_megatron_add_index(tmp_path):
    rng = np.random.default_rng(3)
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ["b_part", "a_part", "c_part"]:
        docs = _random_documents(rng, 20, 3000, sentences=True)
        _megatron_build(str(parts / name), docs, np.uint16)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for name in ["a_part", "b_part", "c_part"]:  # Megatron-LM's merge order: sorted names
        ref.add_index(str(parts / name))
    ref.finalize(str(tmp_path / "ref.idx"))
    assert merge_main(["--input", str(parts), "--output-prefix", str(tmp_path / "merged")]) == 0
    assert _bytes(str(tmp_path / "merged")) == _bytes(str(tmp_path / "ref"))

    # --prefixes: a chosen subset, in the given order.
    ref = IndexedDatasetBuilder(str(tmp_path / "ref2.bin"), dtype=np.uint16)
    for name in ["c_part", "a_part"]:
        ref.add_index(str(parts / name))
    ref.finalize(str(tmp_path / "ref2.idx"))
    assert merge_main(["--input", str(parts), "--output-prefix", str(tmp_path / "merged2"),
                       "--prefixes", "c_part", "a_part"]) == 0
    assert _bytes(str(tmp_path / "merged2")) == _bytes(str(tmp_path / "ref2"))


def test_merge_errors(tmp_path, capsys):
    parts = tmp_path / "parts"
    parts.mkdir()
    _megatron_build(str(parts / "a"), [([1], [1])], np.uint16)
    _megatron_build(str(parts / "b"), [([1], [1])], np.int32)
    assert merge_main(["--input", str(parts), "--output-prefix", str(tmp_path / "m")]) == 1
    assert "dtype" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.bin") and not os.path.exists(tmp_path / "m.idx")
    os.remove(parts / "b.idx")
    assert merge_main(["--input", str(parts), "--output-prefix", str(tmp_path / "m")]) == 1
    assert "no matching .idx" in capsys.readouterr().err
    assert merge_main(["--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "m")]) == 1
