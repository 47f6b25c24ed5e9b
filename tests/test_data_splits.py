"""--split and --data-path blends: bad values refused at start-up, split ranges exactly megatron-core's, and
no dataset build that could spin forever on an empty split (megatron's GPTDataset._get_num_epochs loops
without end when asked for samples from a split without tokens)."""

import os

import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig

from data_cases import build_run_datasets, run_config, write_dataset
from megatron_mile.config import ConfigError
from megatron_mile.data import splits


def _config(tmp_path, data_path, *extra):
    return run_config(data_path, "--data-cache-path", tmp_path / "cache", *extra)


# ------------------------------------------------------------------ flags refused at start-up


@pytest.mark.parametrize("split", ["a,b", "0,100,0", "0,0,0", "1e3,1,0", "-1,2,1", "1,2,3,4", "", "90/10/0",
                                   "9" * 400 + ",1,0"])
def test_bad_split_strings_are_refused(split, tmp_path):
    with pytest.raises(ConfigError, match="--split"):
        _config(tmp_path, ["some/prefix"], f"--split={split}")  # '=': argparse would take "-1,..." for a flag


@pytest.mark.parametrize("split", ["969, 30, 1", "98,2,0", "99,1", "0.9,0.1,0", ".5,.5", "'99,1,0'"])
def test_good_split_strings_are_accepted(split, tmp_path):
    assert _config(tmp_path, ["some/prefix"], "--split", split).data.split == split


def test_validation_needs_a_share_when_the_run_evaluates(tmp_path):
    with pytest.raises(ConfigError, match="gives the validation split no share.*--eval-iters 0"):
        _config(tmp_path, ["some/prefix"], "--split", "100,0,0", "--eval-iters", "2")
    _config(tmp_path, ["some/prefix"], "--split", "100,0,0", "--eval-iters", "0")


@pytest.mark.parametrize("weight", ["-1", "0", "0.0", "nan", "inf", "NaN", "-inf"])
def test_bad_blend_weights_are_refused(weight, tmp_path):
    message = f"--data-path weight '{weight}' of 'b' must be a finite number > 0"
    (problem,) = splits.data_flag_problems(["0.5", "a", weight, "b"], "969,30,1", 1)
    assert problem.startswith(message)
    if weight != "-inf":  # argparse itself takes "-inf" for a flag
        with pytest.raises(ConfigError, match=message):
            _config(tmp_path, ["0.5", "a", weight, "b"])


def test_weights_mixed_with_bare_prefixes_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--data-path mixes weighted and unweighted"):
        _config(tmp_path, ["0.5", "a", "b", "c"])


def test_blends_read_as_megatron_reads_them():
    from megatron.core.datasets.utils import get_blend_from_list

    for data_path in (["a"], ["a", "b"], ["a", "b", "c"], ["3", "a", "1.5", "b"], ["1", "a"]):
        assert splits.parse_blend(data_path) == get_blend_from_list(data_path)


# ------------------------------------------------------------------ split ranges: megatron-core's own


class _RangeRecorder:
    """A stand-in dataset class: megatron's builder hands it the sequence indices of each split."""

    def __init__(self, low_level, path, indices, size, split, config):
        self.indices = indices

    @staticmethod
    def build_low_level_dataset(path, config):
        return int(path)

    @staticmethod
    def numel_low_level_dataset(low_level):
        return low_level


@pytest.mark.parametrize("split", ["969,30,1", "98,2,0", "1,1,1", "0.5,0.3,0.2", "80,20", "7,0,3"])
def test_split_ranges_are_megatrons(split):
    config = BlendedMegatronDatasetConfig(random_seed=0, sequence_length=8, blend=(["x"], None), split=split,
                                          tokenizer=None)
    builder = BlendedMegatronDatasetBuilder(_RangeRecorder, [1, 1, 1], lambda: True, config)
    for n in (1, 2, 3, 7, 33, 120, 333, 499, 500, 1001):
        built = builder._build_megatron_dataset_splits(str(n), config.split_matrix, [1, 1, 1])
        for index, dataset in enumerate(built):
            expected = (0, 0) if dataset is None or not len(dataset.indices) else \
                (int(dataset.indices[0]), int(dataset.indices[-1]) + 1)
            begin, end = splits.split_range(n, splits.split_matrix(split), index)
            assert ((begin, end) if end > begin else (0, 0)) == expected, (split, n, index)


# ------------------------------------------------------------------ building: never an endless loop


def test_a_small_dataset_trains_with_the_default_split(tmp_path, capsys):
    """300 documents: 969,30,1 leaves the test split empty, which the run never samples; it is not built."""
    prefix = write_dataset(str(tmp_path / "small_text_document"), 300)
    train, valid = build_run_datasets(_config(tmp_path, [prefix], "--eval-iters", "1"))
    assert len(train) >= 6 and len(valid) >= 2
    assert "checking 1 dataset(s), then building their training and validation sample indices" in \
        capsys.readouterr().out


def test_an_empty_validation_split_is_refused_before_anything_is_built(tmp_path):
    prefix = write_dataset(str(tmp_path / "tiny_text_document"), 12)
    config = _config(tmp_path, [prefix], "--eval-iters", "1")
    with pytest.raises(splits.DataSplitError) as refused:
        build_run_datasets(config)
    message = str(refused.value)
    assert message.startswith("--split '969, 30, 1' leaves the validation split of " + prefix + " empty")
    assert "holds 12 sequences" in message
    assert not os.path.exists(tmp_path / "cache")  # refused before megatron wrote anything
    suggested = message.split("use e.g. --split ")[1]
    # The suggested split works: both splits the run samples from hold documents.
    train, valid = build_run_datasets(_config(tmp_path, [prefix], "--eval-iters", "1", "--split", suggested))
    assert len(train) > 0 and len(valid) > 0


def test_without_evaluation_only_the_training_split_is_built(tmp_path):
    prefix = write_dataset(str(tmp_path / "tiny_text_document"), 12)
    train, valid = build_run_datasets(_config(tmp_path, [prefix], "--eval-iters", "0"))
    assert len(train) >= 6 and valid is None


def test_the_smallest_dataset_of_a_blend_is_named(tmp_path):
    big = write_dataset(str(tmp_path / "big_text_document"), 400, seed=1)
    tiny = write_dataset(str(tmp_path / "tiny_text_document"), 12, seed=2)
    with pytest.raises(splits.DataSplitError, match=f"validation split of {tiny} empty.*holds 12 sequences"):
        build_run_datasets(_config(tmp_path, ["0.7", big, "0.3", tiny], "--eval-iters", "1"))


def test_a_dataset_too_small_to_split_says_so(tmp_path):
    prefix = write_dataset(str(tmp_path / "one_text_document"), 1)
    with pytest.raises(splits.DataSplitError, match="too small to split: add data, or set --eval-iters 0"):
        build_run_datasets(_config(tmp_path, [prefix], "--eval-iters", "1"))
