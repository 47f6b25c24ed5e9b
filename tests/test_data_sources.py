"""Megatron-LM's data-source and data-loader flags: one blend per split (--train-data-path, --valid-data-path,
--test-data-path, --per-split-data-args-path), --data-args-path, their exclusions, the files read as data
(size, encoding and format errors named), --dataloader-type single / cyclic (Megatron-LM's samplers),
--no-data-sharding, --num-dataset-builder-threads reaching megatron-core's builder."""

from __future__ import annotations

import io
import contextlib
import json

import numpy as np
import pytest
import torch

from data_cases import MODEL_FLAGS, build_run_datasets
from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from megatron_mile.data import blends
from megatron_mile.data.indexed_writer import IndexedDatasetWriter
from megatron_mile.training import data as run_data

# Token ranges of the datasets, disjoint: a sample's tokens say which dataset it came from.
RANGES = {"A": (10, 2000), "B": (3000, 5000), "C": (6000, 8000)}


def write(tmp_path, name, num_documents=60, seed=0):
    """Dataset `name` (documents of 5-39 ids drawn from RANGES[name]); returns its prefix."""
    low, high = RANGES[name]
    rng = np.random.default_rng(seed)
    prefix = str(tmp_path / name)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(num_documents):
            writer.add_document(rng.integers(low, high, size=int(rng.integers(5, 40))).tolist())
        writer.finalize()
    return prefix


def config(tmp_path, *flags):
    return parse_args([*MODEL_FLAGS, "--data-cache-path", str(tmp_path / "cache"), *map(str, flags)])


def sources_of(dataset) -> set:
    """Which of RANGES the dataset's sample tokens fall in."""
    found = set()
    for index in range(len(dataset)):
        tokens = np.asarray(dataset[index]["tokens"])
        for name, (low, high) in RANGES.items():
            if ((tokens >= low) & (tokens < high)).any():
                found.add(name)
    return found


# ------------------------------------------------------------------ one blend per split


def test_per_split_paths_read_each_split_from_its_own_datasets(tmp_path):
    a, b = write(tmp_path, "A"), write(tmp_path, "B")
    train, valid = build_run_datasets(config(tmp_path, "--train-data-path", a, "--valid-data-path", b,
                                             "--eval-iters", "2"))
    assert sources_of(train) == {"A"}
    assert sources_of(valid) == {"B"}
    # The same datasets through --data-path are split: both splits come from A.
    train, valid = build_run_datasets(config(tmp_path, "--data-path", a, "--split", "80,20,0", "--eval-iters", "2"))
    assert sources_of(train) == sources_of(valid) == {"A"}


def sources_of_built(argv):
    """Worker body (megatron's blended datasets need a process group): sources_of each built dataset, and
    the tokens of the first training samples."""
    train, valid = build_run_datasets(parse_args(argv))
    return [sources_of(d) for d in (train, valid)], [np.asarray(train[i]["tokens"]).tolist() for i in range(4)]


def test_a_weighted_per_split_blend_reads_both_datasets(tmp_path, dist_pool):
    a, b, c = write(tmp_path, "A"), write(tmp_path, "B"), write(tmp_path, "C")
    argv = [*MODEL_FLAGS, "--data-cache-path", str(tmp_path / "cache"), "--train-data-path", "0.5", a, "0.5", b,
            "--valid-data-path", c, "--eval-iters", "2"]
    (train, valid), _ = dist_pool(1).run(sources_of_built, argv)[0]
    assert train == {"A", "B"}
    assert valid == {"C"}


def test_the_test_data_is_built_from_test_data_path_and_evaluated_at_the_end(tmp_path, dist_pool):
    a, b, c = write(tmp_path, "A"), write(tmp_path, "B"), write(tmp_path, "C")
    run = config(tmp_path, "--train-data-path", a, "--valid-data-path", b, "--test-data-path", c, "--eval-iters", "2")
    test = run_data.build_test_dataset(run, run_data.build_run_tokenizer(run), 4)
    assert len(test) >= 4 and sources_of(test) == {"C"}
    argv = [*MODEL_FLAGS, "--data-cache-path", str(tmp_path / "cache"), "--train-data-path", a,
            "--valid-data-path", b, "--eval-iters", "1", "--no-progress"]
    tested, stdout = dist_pool(1).run(train_and_test, argv + ["--test-data-path", c])[0]
    assert tested[0] == 3 and np.isfinite(tested[1])
    assert " test loss at iteration 3 " in stdout
    without, stdout = dist_pool(1).run(train_and_test, argv)[0]
    assert without is None and " test loss " not in stdout


def train_and_test(argv):
    """Worker body: (the run's test result, its stdout)."""
    from megatron_mile.training.loop import pretrain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = pretrain(parse_args(argv))
    return result.test, out.getvalue()


def test_per_split_data_args_path_reads_the_json_file(tmp_path):
    a, b = write(tmp_path, "A"), write(tmp_path, "B")
    path = tmp_path / "per_split.json"
    path.write_text(json.dumps({"train": f"1 {a}", "valid": [b], "test": None}))
    train, valid = build_run_datasets(config(tmp_path, "--per-split-data-args-path", path, "--eval-iters", "2"))
    assert sources_of(train) == {"A"} and sources_of(valid) == {"B"}


def test_data_args_path_holds_the_data_path_value(tmp_path, dist_pool):
    a, b = write(tmp_path, "A"), write(tmp_path, "B")
    path = tmp_path / "data_args.txt"
    path.write_text(f"0.3 {a}\n0.7 {b}\n")
    common = [*MODEL_FLAGS, "--data-cache-path", str(tmp_path / "cache"), "--eval-iters", "2"]
    from_file = dist_pool(1).run(sources_of_built, common + ["--data-args-path", str(path)])[0]
    from_flag = dist_pool(1).run(sources_of_built, common + ["--data-path", "0.3", a, "0.7", b])[0]
    other = dist_pool(1).run(sources_of_built, common + ["--data-path", "0.7", a, "0.3", b])[0]
    assert from_file[0][0] == {"A", "B"}
    assert from_file == from_flag
    assert other[1] != from_flag[1]  # the weights the file gives matter


@pytest.mark.parametrize("flags, message", [
    (["--data-path", "x", "--train-data-path", "y"], "give exactly one data source"),
    (["--data-path", "x", "--data-args-path", "f"], "give one of --data-path or --data-args-path"),
    (["--train-data-path", "x", "--per-split-data-args-path", "f"], "give one of --train-data-path or "
                                                                     "--per-split-data-args-path"),
    (["--mock-data", "--valid-data-path", "x"], "give exactly one data source"),
    (["--train-data-path", "x", "--valid-data-path", "y", "--split", "9,1,0"], "--split '9,1,0' applies to --data-path"),
    (["--valid-data-path", "y"], "needs training data: add --train-data-path"),
    (["--train-data-path", "x", "--eval-iters", "2"], "--eval-iters 2 evaluates on validation data"),
    (["--train-data-path", "x", "--dataloader-type", "external"], "--dataloader-type external"),
    (["--train-data-path", "0.5", "x", "y", "z", "--eval-iters", "0"], "--train-data-path mixes weighted"),
    (["--mock-data", "--num-dataset-builder-threads", "0"], "--num-dataset-builder-threads must be >= 1"),
])
def test_conflicting_data_flags_stop_at_start_up(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args([*MODEL_FLAGS, *flags])


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"\xff\xfe\x00 binary", "not UTF-8 text"),
])
def test_data_args_files_are_read_as_text(tmp_path, content, message):
    path = tmp_path / "args"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"--data-args-path {path}: {message}"):
        parse_args([*MODEL_FLAGS, "--data-args-path", str(path)])
    with pytest.raises(ConfigError, match="--data-args-path .*missing: cannot be read"):
        parse_args([*MODEL_FLAGS, "--data-args-path", str(tmp_path / "missing")])


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"train": ["a"], "validation": ["b"]}', "unknown key.*'validation'"),
    ('{"train": [1, "a"]}', "'train' must be a list of strings"),
])
def test_per_split_files_are_checked(tmp_path, content, message):
    path = tmp_path / "per_split.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        parse_args([*MODEL_FLAGS, "--per-split-data-args-path", str(path), "--eval-iters", "0"])


def test_an_oversized_data_args_file_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "args"
    path.write_text("prefix " * 100)
    monkeypatch.setattr(blends, "MAX_DATA_ARGS_BYTES", 64)
    with pytest.raises(ConfigError, match="700 bytes, more than the 64"):
        parse_args([*MODEL_FLAGS, "--data-args-path", str(path)])


# ------------------------------------------------------------------ --dataloader-type, --no-data-sharding


def megatron_random_sampler(total, consumed, mbs, rank, dp, sharding):
    """Megatron-LM's MegatronPretrainingRandomSampler as its source reads, one epoch: written out here as the
    reference (loops, no shared code)."""
    stride = mbs * dp
    active = total - total % stride
    epoch, offset = consumed // active, consumed % active
    g = torch.Generator()
    g.manual_seed(epoch)
    if sharding:
        bucket = (total // stride) * mbs
        indices = [rank * bucket + x for x in torch.randperm(bucket, generator=g).tolist()[offset // dp:]]
    else:
        indices = torch.randperm((total // mbs) * mbs, generator=g).tolist()[offset:active][rank::dp]
    batches, batch = [], []
    for index in indices:
        batch.append(index)
        if len(batch) == mbs:
            batches.append(batch)
            batch = []
    return batches


@pytest.mark.parametrize("sharding", [True, False])
@pytest.mark.parametrize("total, mbs, dp, consumed", [(24, 2, 2, 0), (27, 2, 3, 12), (10, 1, 4, 16)])
def test_cyclic_sampler_is_megatrons_random_sampler(sharding, total, mbs, dp, consumed):
    epoch_union = []
    for rank in range(dp):
        got = list(run_data.CyclicMicroBatchSampler(total, consumed, mbs, rank, dp, sharding))
        assert got == megatron_random_sampler(total, consumed, mbs, rank, dp, sharding)
        if consumed == 0:
            epoch_union += [i for batch in got for i in batch]
    if consumed == 0:  # an epoch reads each of its samples once over all ranks
        active = total - total % (mbs * dp)
        assert len(epoch_union) == len(set(epoch_union)) == active


@pytest.fixture
def one_data_parallel_rank(monkeypatch):
    monkeypatch.setattr(run_data.parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(run_data.parallel_state, "get_data_parallel_world_size", lambda: 1)


class Numbered(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"tokens": np.full(4, index), "labels": np.zeros(4), "loss_mask": np.ones(4),
                "position_ids": np.arange(4)}


def read_order(flags, batches):
    run = parse_args([*MODEL_FLAGS, "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                      "--micro-batch-size", "2", *flags])
    iterator = run_data.micro_batch_iterator(Numbered(), run, 0)
    return [next(iterator)["tokens"][:, 0].tolist() for _ in range(batches)]


def test_dataloader_type_orders_the_samples(one_data_parallel_rank):
    single = read_order([], 4)
    assert single == [[0, 1], [2, 3], [4, 5], [6, 7]]  # Megatron-LM's pretraining sampler: in order
    cyclic = read_order(["--dataloader-type", "cyclic"], 8)  # two epochs, each a permutation
    first, second = [i for b in cyclic[:4] for i in b], [i for b in cyclic[4:] for i in b]
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    assert cyclic == (megatron_random_sampler(8, 0, 2, 0, 1, True) + megatron_random_sampler(8, 8, 2, 0, 1, True))
    # The single sampler ends with the dataset (training datasets are sized for the run).
    assert len(list(run_data.micro_batch_iterator(Numbered(), parse_args(
        [*MODEL_FLAGS, "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
         "--micro-batch-size", "2"]), 0))) == 4


def test_no_data_sharding_deals_one_permutation_round_robin():
    sharded = [list(run_data.CyclicMicroBatchSampler(16, 0, 2, rank, 2, True)) for rank in range(2)]
    dealt = [list(run_data.CyclicMicroBatchSampler(16, 0, 2, rank, 2, False)) for rank in range(2)]
    assert all(i < 8 for b in sharded[0] for i in b) and all(i >= 8 for b in sharded[1] for i in b)
    assert dealt != sharded


# ------------------------------------------------------------------ --num-dataset-builder-threads


def builder_pool_sizes(argv):
    """Worker body: the max_workers of every thread pool megatron's dataset builder opens for `argv`."""
    from megatron.core.datasets import blended_megatron_dataset_builder as builder

    pools = []
    real = builder.ThreadPoolExecutor

    def recording(max_workers=None, **kwargs):
        pools.append(max_workers)
        return real(max_workers=max_workers, **kwargs)

    builder.ThreadPoolExecutor = recording
    try:
        build_run_datasets(parse_args(argv))
    finally:
        builder.ThreadPoolExecutor = real
    return pools


def test_num_dataset_builder_threads_reaches_megatrons_builder(tmp_path, dist_pool):
    a, b = write(tmp_path, "A"), write(tmp_path, "B")
    argv = [*MODEL_FLAGS, "--data-cache-path", str(tmp_path / "cache"), "--data-path", a, b, "--split", "80,20,0"]
    assert set(dist_pool(1).run(builder_pool_sizes, argv + ["--num-dataset-builder-threads", "3"])[0]) == {3}
    assert set(dist_pool(1).run(builder_pool_sizes, argv)[0]) == {1}
    assert parse_args([*MODEL_FLAGS, "--mock-data"]).data.num_dataset_builder_threads == 1  # Megatron-LM's default
