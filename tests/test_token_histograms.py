"""Token entropy and weight histograms over training (megatron_mile.training.token_histograms): binning
against numpy.histogram, the interval flag, and the TensorBoard events of a DP=2 run checked against the
step's own logged scalars (token count, mean entropy, weight min / mean / max come from another code path:
megatron_mile.loss.reduction)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from megatron_mile.training.token_histograms import NUM_BINS, histogram_interval, reduce_histograms
from tiny_model import mock_data_flags, model_flags

TINY = model_flags(num_layers=2, hidden_size=32) + mock_data_flags(300) + (
    "--init-method-std 0.25 --lr 1e-3 --eval-iters 0 --micro-batch-size 2 --global-batch-size 8 --seed 7 "
    "--no-progress --loss-type mile"
).split()


def test_binning_matches_numpy_histogram():
    rng = np.random.default_rng(0)
    values = np.stack([rng.gamma(2.0, 1.5, size=1000), rng.normal(4.0, 1.0, size=1000)], axis=1)
    values[17, 1] = np.nan  # a non-finite token is left out of both histograms
    histograms = reduce_histograms(torch.from_numpy(values))
    kept = values[np.isfinite(values).all(axis=1)]
    for column, histogram in enumerate(histograms):
        expected, edges = np.histogram(kept[:, column], bins=NUM_BINS)
        assert histogram.bucket_counts == expected.tolist()
        np.testing.assert_allclose(histogram.bucket_limits, edges[1:], rtol=1e-12)
        assert histogram.num == len(kept)
        assert histogram.min == kept[:, column].min() and histogram.max == kept[:, column].max()
        assert math.isclose(histogram.sum, kept[:, column].sum(), rel_tol=1e-12)
        assert math.isclose(histogram.sum_squares, (kept[:, column] ** 2).sum(), rel_tol=1e-12)


def test_constant_and_empty_inputs():
    constant, entropy = reduce_histograms(torch.tensor([[1.0, 0.5], [1.0, 2.5], [1.0, 1.5]]))
    assert (constant.bucket_limits, constant.bucket_counts, constant.num) == ([1.0], [3.0], 3.0)
    assert sum(entropy.bucket_counts) == 3
    empty = reduce_histograms(None)
    assert [h.num for h in empty] == [0.0, 0.0] and empty[0].bucket_counts == []


def test_interval_defaults_to_the_eval_interval_with_tensorboard_and_zero_is_off():
    assert histogram_interval(None, 200, "tb") == 200
    assert histogram_interval(None, 200, None) == 0
    assert histogram_interval(0, 200, "tb") == 0
    assert histogram_interval(5, 200, "tb") == 5
    with pytest.raises(ConfigError, match="add --tensorboard-dir"):
        parse_args(TINY + ["--train-iters", "1", "--log-entropy-histogram-interval", "5"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        parse_args(TINY + ["--train-iters", "1", "--log-entropy-histogram-interval", "-1", "--tensorboard-dir", "x"])


def train_with_histograms(argv, world_size):
    from megatron_mile.training.loop import pretrain

    return len(pretrain(parse_args(argv, world_size=world_size)).history)


def read_events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    return events


def test_histograms_are_written_with_the_right_counts(dist_pool, tmp_path):
    tensorboard = tmp_path / "tb"
    argv = TINY + ["--train-iters", "4", "--log-interval", "1", "--log-entropy-histogram-interval", "2",
                   "--tensorboard-dir", str(tensorboard)]
    assert dist_pool(2).run(train_with_histograms, argv, 2) == [4, 4]  # DP=2, 2 micro-batches each
    events = read_events(tensorboard)
    assert {"train/token entropy", "train/token weight"} <= set(events.Tags()["histograms"])
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)}
               for tag in ("train/mean entropy", "train/weight mean", "train/weight min", "train/weight max")}
    tokens_per_step = 8 * 32  # global batch x sequence; mock data masks no token
    entropy_events = {e.step: e.histogram_value for e in events.Histograms("train/token entropy")}
    weight_events = {e.step: e.histogram_value for e in events.Histograms("train/token weight")}
    assert sorted(entropy_events) == sorted(weight_events) == [2, 4]  # every 2nd iteration only
    for step in (2, 4):
        entropy, weight = entropy_events[step], weight_events[step]
        for histogram in (entropy, weight):
            assert histogram.num == tokens_per_step and sum(histogram.bucket) == tokens_per_step
            assert len(histogram.bucket) == NUM_BINS
        assert math.isclose(entropy.sum / entropy.num, scalars["train/mean entropy"][step], rel_tol=1e-5)
        assert math.isclose(weight.sum / weight.num, scalars["train/weight mean"][step], rel_tol=1e-5)
        assert math.isclose(weight.min, scalars["train/weight min"][step], rel_tol=1e-6)
        assert math.isclose(weight.max, scalars["train/weight max"][step], rel_tol=1e-6)
        # MiLe with sigma = gamma = 1: every weight is 1 + its token's entropy.
        assert math.isclose(weight.sum, entropy.sum + tokens_per_step, rel_tol=1e-6)
        assert 0.0 <= entropy.min <= entropy.max <= math.log(301) + 1e-4

