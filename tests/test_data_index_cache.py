"""megatron-core reads its dataset index caches with numpy.load(allow_pickle=True): a cache file that is a
pickle must never be unpickled. The pickle here would create a marker file when loaded; the marker must
not appear, and training and evaluation must stop with a message naming the file."""

import glob
import os
import pickle

import numpy as np
import pytest

from data_cases import build_run_datasets, run_config, write_dataset
from megatron_mile.data.index_cache import IndexCacheError, check_plain_npy
from megatron_mile.evaluation import datasets as eval_data
from megatron_mile.training import data as run_data


class CreatesFileWhenUnpickled:
    """Unpickling this calls open(path, "w"): the file appearing proves the pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _poison(cache_files, marker):
    for path in cache_files:
        with open(path, "wb") as f:
            pickle.dump(CreatesFileWhenUnpickled(marker), f)


def _cache_files(directory):
    return sorted(glob.glob(os.path.join(directory, "**", "*.npy"), recursive=True))


@pytest.mark.parametrize("cache_flag", [False, True], ids=["cache_beside_the_data", "data_cache_path"])
def test_a_pickled_training_index_cache_is_refused_unopened(cache_flag, tmp_path):
    os.makedirs(tmp_path / "shared")  # a dataset someone handed over, caches included
    prefix = write_dataset(str(tmp_path / "shared" / "corpus_text_document"), 300)
    extra = ["--data-cache-path", tmp_path / "cache"] if cache_flag else []
    config = run_config([prefix], "--eval-iters", "1", *extra)
    build_run_datasets(config)  # megatron writes its caches (plain arrays) ...
    cache_dir = str(tmp_path / "cache") if cache_flag else prefix
    written = _cache_files(cache_dir)
    assert any(p.endswith("document_index.npy") for p in written)
    assert build_run_datasets(config)[0] is not None  # ... and a clean cache is read back

    marker = tmp_path / "code_ran"
    _poison([p for p in written if p.endswith("document_index.npy")], marker)
    with pytest.raises(IndexCacheError) as refused:
        build_run_datasets(config)
    assert not marker.exists()
    message = str(refused.value)
    assert "not a .npy array file" in message and "unpickle" in message
    assert message.split()[3] in written  # "dataset index cache <path> is ..."


def test_a_pickled_evaluation_index_cache_is_refused_unopened(tmp_path):
    prefix = write_dataset(str(tmp_path / "corpus_text_document"), 300)
    config = run_config([prefix], "--eval-iters", "1", "--split", "80,20,0")
    tokenizer = run_data.build_run_tokenizer(config)
    domains = eval_data.validation_domains([prefix], config.data.split)
    eval_data.build_validation_datasets(config, tokenizer, domains)
    assert domains[0].num_samples > 0
    marker = tmp_path / "code_ran"
    _poison(_cache_files(prefix), marker)
    domains = eval_data.validation_domains([prefix], config.data.split)
    with pytest.raises(IndexCacheError, match="dataset index cache .*-document_index.npy is not a .npy array"):
        eval_data.build_validation_datasets(config, tokenizer, domains)
    assert not marker.exists()


def test_npy_files_are_judged_by_their_header_alone(tmp_path):
    plain = tmp_path / "plain.npy"
    np.save(plain, np.arange(10, dtype=np.int32))
    check_plain_npy(str(plain))
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([CreatesFileWhenUnpickled(tmp_path / "marker"), 1], dtype=object), allow_pickle=True)
    with pytest.raises(IndexCacheError, match="objects.npy holds Python objects"):
        check_plain_npy(str(objects))
    assert not (tmp_path / "marker").exists()
    for name, content in [("empty.npy", b""), ("text.npy", b"hello"), ("header.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(IndexCacheError, match=name):
            check_plain_npy(str(tmp_path / name))
