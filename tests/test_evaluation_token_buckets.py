"""Token-frequency buckets: counting over indexed datasets and the 80/15/5% buckets, each checked against a
plain-Python reference (collections.Counter, sorted, exact fractions) that shares no code with the module.
"""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from megatron_mile.evaluation import token_buckets
from megatron_mile.evaluation.token_buckets import (
    SequenceRange,
    TokenBucketError,
    build_buckets,
    count_tokens,
    split_sequence_range,
)


def reference_buckets(counter: Counter, vocab_size: int, fractions=("0.80", "0.15", "0.05")) -> list:
    """Bucket of every token id: the number of cumulative boundaries that the share of occurrences held by
    strictly more frequent tokens has reached. Exact arithmetic; ties share a bucket by construction."""
    total = sum(counter.values())
    boundaries, running = [], Fraction(0)
    for f in fractions[:-1]:
        running += Fraction(f)
        boundaries.append(running)
    buckets = []
    for token in range(vocab_size):
        mine = counter.get(token, 0)
        more_frequent = sum(c for t, c in counter.items() if c > mine)
        share = Fraction(more_frequent, total)
        buckets.append(sum(1 for b in boundaries if share >= b))
    return buckets


def counts_array(counter: Counter, vocab_size: int) -> np.ndarray:
    return np.array([counter.get(t, 0) for t in range(vocab_size)], dtype=np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_buckets_match_the_reference_on_zipf_counts(seed):
    rng = random.Random(seed)
    vocab = rng.choice([7, 50, 300])
    # Zipf-like draws leave some ids unseen (count 0) and many small counts tied.
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(vocab)]
    ids = list(range(vocab))
    rng.shuffle(ids)
    counter = Counter(rng.choices(ids, weights=weights, k=rng.choice([20, 500, 5000])))
    buckets = build_buckets(counts_array(counter, vocab))
    assert buckets.bucket_of_token.tolist() == reference_buckets(counter, vocab)
    # The high bucket is the smallest most-frequent set reaching 80%: it covers at least 80%, and without
    # its least frequent tokens it would not.
    counts = counts_array(counter, vocab)
    high = buckets.bucket_of_token == 0
    assert counts[high].sum() >= 0.8 * counts.sum()
    assert counts[high & (counts > counts[high].min())].sum() < 0.8 * counts.sum()


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([80, 15, 5], [0, 1, 2]),  # exact boundaries: 80% and 95% start the next bucket
        ([40, 40, 15, 5], [0, 0, 1, 2]),
        ([30, 30, 30, 10], [0, 0, 0, 1]),  # a tie straddling 80% stays together in high
        ([5, 80, 0, 15, 0], [2, 0, 2, 1, 2]),  # ids in any order; unseen ids are in low
        ([10, 10, 10, 10, 10], [0, 0, 0, 0, 0]),  # all tied: everything is high
        ([79, 1, 15, 5], [0, 2, 0, 1]),  # 15 starts at 79% < 80%: high; 5 at 94%: medium; 1 at 99%: low
    ],
)
def test_buckets_at_ties_and_boundaries(counts, expected):
    counter = Counter({t: c for t, c in enumerate(counts) if c})
    assert reference_buckets(counter, len(counts)) == expected  # the reference agrees with the hand result
    assert build_buckets(np.array(counts)).bucket_of_token.tolist() == expected


def test_buckets_do_not_depend_on_token_ids():
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.5, size=200).astype(np.int64)
    permutation = rng.permutation(200)
    assert np.array_equal(build_buckets(counts[permutation]).bucket_of_token,
                          build_buckets(counts).bucket_of_token[permutation])


def test_summary_reports_coverage_and_count_ranges():
    buckets = build_buckets(np.array([50, 30, 10, 5, 5, 0]))
    rows = {row["bucket"]: row for row in buckets.summary()}
    assert rows["high"]["token_ids"] == 2 and rows["high"]["training_fraction"] == pytest.approx(0.8)
    assert (rows["medium"]["min_count"], rows["medium"]["max_count"]) == (5, 10)
    assert rows["low"]["token_ids"] == 1 and rows["low"]["training_occurrences"] == 0


@pytest.mark.parametrize("fractions", [(0.8, 0.15), (0.8, 0.3, -0.1), ()])
def test_bad_fractions_are_rejected(fractions):
    with pytest.raises(TokenBucketError, match="sum to 1"):
        build_buckets(np.array([3, 2, 1]), fractions)


def test_no_training_tokens_is_a_clear_error():
    with pytest.raises(TokenBucketError, match="holds no tokens"):
        build_buckets(np.zeros(5, dtype=np.int64))


# ----------------------------------------------------------------------------------------------- counting


def write_dataset(prefix: str, documents, dtype=np.uint16) -> None:
    """An indexed dataset written with megatron-core's own builder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        builder.add_document(torch.tensor(document, dtype=torch.int64), [len(document)])
    builder.finalize(prefix + ".idx")


def read_documents(prefix: str) -> list:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    rng = random.Random(3)
    directory = tmp_path_factory.mktemp("counting")
    prefixes = []
    for name in ("a", "b"):
        documents = [[rng.randrange(60) for _ in range(rng.randrange(1, 40))] for _ in range(25)]
        prefix = str(directory / name)
        write_dataset(prefix, documents)
        prefixes.append(prefix)
    return prefixes


@pytest.mark.parametrize("chunk_tokens", [1 << 24, 7])
def test_counts_of_the_training_split_match_a_counter(two_datasets, monkeypatch, chunk_tokens):
    monkeypatch.setattr(token_buckets, "_COUNT_CHUNK_TOKENS", chunk_tokens)  # 7: many slices per range
    from megatron_mile.evaluation.datasets import training_ranges

    ranges = training_ranges(two_datasets, "80,20,0")
    reference = Counter()
    for prefix in two_datasets:
        documents = read_documents(prefix)
        end = int(round(0.8 * len(documents)))  # megatron's rounding of the split boundary
        for document in documents[:end]:
            reference.update(document)
    counts, max_ids = count_tokens(ranges, 64)
    assert counts.tolist() == counts_array(reference, 64).tolist()
    assert max_ids.max() < 60
    # Split over 3 "ranks", the pieces add up to the same counts.
    pieces = [count_tokens(ranges, 64, rank, 3)[0] for rank in range(3)]
    assert sum(pieces).tolist() == counts.tolist()


def test_split_ranges_follow_megatrons_rounding():
    matrix = [(0.0, 0.969), (0.969, 0.999), (0.999, 1.0)]
    assert split_sequence_range("p", 1000, matrix, 1) == SequenceRange("p", 969, 999)
    assert split_sequence_range("p", 7, matrix, 0) == SequenceRange("p", 0, 7)  # round(6.783) = 7
    assert split_sequence_range("p", 7, [(0, 1.0), None, None], 1) == SequenceRange("p", 0, 0)


def test_token_ids_beyond_the_vocabulary_are_a_clear_error(tmp_path):
    from megatron_mile.evaluation.token_buckets import count_tokens_distributed

    prefix = str(tmp_path / "foreign")
    write_dataset(prefix, [[1, 2, 3], [4, 500, 6]])
    with pytest.raises(TokenBucketError, match=r"foreign' holds token id 500.*vocabulary has 100 entries.*preprocess_data"):
        count_tokens_distributed([SequenceRange(prefix, 0, 2)], 100)
