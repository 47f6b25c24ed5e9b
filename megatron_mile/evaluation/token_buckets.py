"""Token-frequency buckets of the MiLe paper: count how often each token id occurs, rank, split by coverage.

The paper groups the vocabulary by training-corpus frequency so that the high / medium / low buckets cover
80% / 15% / 5% of all token occurrences, and reports perplexity per bucket (docs/mile-loss.md). Here:

- Counting reads megatron-core's IndexedDataset (.bin/.idx) directly: the tokens of a contiguous range of
  sequences are one contiguous slice of the memory-mapped .bin file, so a whole corpus is counted with
  numpy.bincount over large slices, never token by token.
- Buckets follow the coverage of the tokens MORE frequent than a token: token v with count c_v is in
  bucket k when  sum(c_u for u with c_u > c_v) / total  lies in bucket k's coverage interval
  ([0, 0.80), [0.80, 0.95), [0.95, 1] by default). So the high bucket is the smallest set of most-frequent
  tokens that reaches 80%, tokens with equal counts always share a bucket (the result does not depend on
  token ids), and tokens never seen in the training data (count 0) are in the last bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_mile.data.splits import split_range

BUCKET_NAMES = ("high", "medium", "low")
DEFAULT_FRACTIONS = (0.80, 0.15, 0.05)

# Tokens per numpy.bincount call: large enough that the per-call overhead vanishes, small enough that the
# int64 copy bincount makes of a uint16 slice stays at 128 MiB.
_COUNT_CHUNK_TOKENS = 1 << 24


class TokenBucketError(ValueError):
    """Data or settings the buckets cannot be built from; the message names the problem and the fix."""


@dataclass(frozen=True)
class SequenceRange:
    """Sequences [begin, end) of one indexed dataset (a split of it, or all of it)."""

    prefix: str
    begin: int
    end: int


def split_sequence_range(prefix: str, num_sequences: int, split_matrix, split_index: int) -> SequenceRange:
    """The sequences of one split of a dataset, exactly as megatron-core's dataset builder selects them.

    `split_matrix` is GPTDatasetConfig.split_matrix ([(begin, end) fractions or None] per split); the
    rounding is megatron_mile.data.splits.split_range, so the training and validation ranges here are the
    ones training used.
    """
    begin, end = split_range(num_sequences, split_matrix, split_index)
    return SequenceRange(prefix, begin, end)


def _open_indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, multimodal=False, mmap=True)


def num_sequences(prefix: str) -> int:
    """Sequences (documents in document mode) stored in the indexed dataset `prefix`. No collectives."""
    return int(_open_indexed(prefix).index.sequence_lengths.shape[0])


def count_tokens(ranges: Sequence[SequenceRange], vocab_size: int, rank: int = 0,
                 world_size: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Occurrences of each token id in the given sequence ranges, and the largest id seen in each range.

    Returns (counts int64 [vocab_size], max_ids int64 [len(ranges)], -1 for an empty range). Ids >= vocab_size
    are left out of the counts; check_vocabulary reports them. With world_size > 1 this call reads only
    every world_size-th slice of the data, starting at `rank`: summing the counts (and taking the max of
    max_ids) over all ranks gives the full result (count_tokens_distributed). No collectives.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    max_ids = np.full(len(ranges), -1, dtype=np.int64)
    slice_index = 0
    for range_index, seq_range in enumerate(ranges):
        if seq_range.end <= seq_range.begin:
            continue
        dataset = _open_indexed(seq_range.prefix)
        index = dataset.index
        dtype = index.dtype
        itemsize = np.dtype(dtype).itemsize
        # Sequences are stored back to back: the range is one slice of the .bin file.
        first_byte = int(index.sequence_pointers[seq_range.begin])
        total = int(index.sequence_lengths[seq_range.begin:seq_range.end].sum(dtype=np.int64))
        for start in range(0, total, _COUNT_CHUNK_TOKENS):
            if slice_index % world_size == rank:
                count = min(_COUNT_CHUNK_TOKENS, total - start)
                tokens = dataset.bin_reader.read(dtype=dtype, count=count, offset=first_byte + start * itemsize)
                found = np.bincount(tokens)  # [max id + 1] occurrences
                max_ids[range_index] = max(max_ids[range_index], found.shape[0] - 1)
                kept = min(found.shape[0], vocab_size)
                counts[:kept] += found[:kept]
            slice_index += 1
    return counts, max_ids


def check_vocabulary(ranges: Sequence[SequenceRange], max_ids: np.ndarray, vocab_size: int) -> None:
    """Raise TokenBucketError naming the first dataset that holds a token id >= vocab_size. No collectives."""
    for seq_range, max_id in zip(ranges, max_ids):
        if max_id >= vocab_size:
            raise TokenBucketError(
                f"dataset {seq_range.prefix!r} holds token id {int(max_id)}, but the model's vocabulary has "
                f"{vocab_size} entries: the data was tokenized with another tokenizer. Re-run "
                "tools/preprocess_data.py with the tokenizer the checkpoint was trained with, or evaluate a "
                "checkpoint trained on this data"
            )


def count_tokens_distributed(ranges: Sequence[SequenceRange], vocab_size: int) -> np.ndarray:
    """count_tokens split over all ranks of the default group: every rank gets the full int64 [vocab] counts.

    Each rank reads 1/world of the slices. Raises TokenBucketError on every rank alike when any rank saw a
    token id outside the vocabulary (check_vocabulary).

    Collectives: one all-reduce (SUM) of the int64 [vocab_size] counts and one all-reduce (MAX) of the
    int64 [len(ranges)] largest ids, over the default group; none without torch.distributed.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        counts, max_ids = count_tokens(ranges, vocab_size)
    else:
        local_counts, local_max = count_tokens(ranges, vocab_size, dist.get_rank(), dist.get_world_size())
        counts_tensor, max_tensor = torch.from_numpy(local_counts), torch.from_numpy(local_max)
        dist.all_reduce(counts_tensor, op=dist.ReduceOp.SUM)
        if len(ranges):
            dist.all_reduce(max_tensor, op=dist.ReduceOp.MAX)
        counts, max_ids = counts_tensor.numpy(), max_tensor.numpy()
    check_vocabulary(ranges, max_ids, vocab_size)
    return counts


@dataclass
class TokenBuckets:
    """Which bucket every token id is in, and what each bucket covers.

    bucket_of_token: int64 [vocab_size], 0 = high ... len(names) - 1 = low.
    counts: the training-data occurrences the buckets were built from, int64 [vocab_size].
    """

    names: Tuple[str, ...]
    fractions: Tuple[float, ...]
    bucket_of_token: np.ndarray
    counts: np.ndarray

    def summary(self) -> List[dict]:
        """Per bucket: name, target coverage, token ids in it, occurrences and the share they cover, and
        the lowest / highest training count of its tokens."""
        total = int(self.counts.sum())
        rows = []
        for index, name in enumerate(self.names):
            members = self.bucket_of_token == index
            occurrences = int(self.counts[members].sum())
            rows.append({
                "bucket": name,
                "target_fraction": self.fractions[index],
                "token_ids": int(members.sum()),
                "training_occurrences": occurrences,
                "training_fraction": occurrences / total if total else float("nan"),
                "min_count": int(self.counts[members].min()) if members.any() else None,
                "max_count": int(self.counts[members].max()) if members.any() else None,
            })
        return rows


def validate_fractions(fractions: Sequence[float]) -> Tuple[float, ...]:
    """The bucket coverages as a tuple; they must be positive and sum to 1 (to 1e-6)."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) < 1 or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise TokenBucketError(
            f"bucket fractions {list(fractions)} must be positive and sum to 1 (the paper's are 0.80 0.15 0.05)"
        )
    return fractions


def build_buckets(counts: np.ndarray, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  names: Optional[Sequence[str]] = None) -> TokenBuckets:
    """Assign every token id to a frequency bucket by the coverage of the tokens more frequent than it.

    counts: int [vocab_size] training occurrences per token id. No collectives.
    """
    fractions = validate_fractions(fractions)
    if names is None:
        names = BUCKET_NAMES if len(fractions) == len(BUCKET_NAMES) else tuple(f"bucket{i}" for i in range(len(fractions)))
    if len(names) != len(fractions):
        raise TokenBucketError(f"{len(names)} bucket names for {len(fractions)} fractions")
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise TokenBucketError("the training data holds no tokens: nothing to rank the vocabulary by")
    # Coverage of all tokens strictly more frequent than each token: sort the counts descending, take the
    # exclusive running sum, and give tied counts the running sum at their first position.
    order = np.argsort(-counts, kind="stable")  # [V] token ids, most frequent first
    sorted_counts = counts[order]  # [V]
    before = np.concatenate([[0], np.cumsum(sorted_counts)[:-1]])  # [V] occurrences ahead of each position
    first_of_tie = np.searchsorted(-sorted_counts, -sorted_counts, side="left")  # [V]
    covered_before = np.empty_like(before)
    covered_before[order] = before[first_of_tie]
    # Exact comparison with each cumulative boundary b = p / q (0.80 = 4/5, 0.95 = 19/20):
    # covered_before / total >= b  <=>  covered_before * q >= p * total, in integers, so a token that starts
    # exactly at 80% is in the medium bucket whatever float rounding would say.
    bucket_of_token = np.zeros(counts.shape[0], dtype=np.int64)
    cumulative = Fraction(0)
    for fraction in fractions[:-1]:
        cumulative += Fraction(repr(fraction)).limit_denominator(10**6)
        bucket_of_token += (covered_before * cumulative.denominator >= cumulative.numerator * total).astype(np.int64)
    return TokenBuckets(tuple(names), fractions, bucket_of_token, counts)
