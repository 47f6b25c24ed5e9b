"""Distributions of per-token entropy and loss weight over one training step, for TensorBoard histograms.

How token difficulty moves through training: every --log-entropy-histogram-interval iterations the step
keeps each loss-masked token's [weight, entropy] (megatron_mile.training.step, last pipeline stage), and
this module bins them into one histogram per quantity over the GLOBAL batch. The bins are reduced, not the
tokens: each data-parallel rank bins its own tokens on common edges, and the counts are summed, so the
cost is two small all-reduces whatever the batch size (a 4M-token batch is never gathered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

NUM_BINS = 64
# Column order of the [n, 2] token values (StepResult.token_values) and the TensorBoard tags they get.
QUANTITIES = ("weight", "entropy")
TAGS = {"weight": "train/token weight", "entropy": "train/token entropy"}


@dataclass
class Histogram:
    """One quantity's distribution, in TensorBoard's raw-histogram terms (bucket_limits = right edges)."""

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: List[float]
    bucket_counts: List[float]


def bin_indices(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, num_bins: int) -> torch.Tensor:
    """values [n] -> bin index [n] in [0, num_bins) of num_bins equal bins over [low, high] (high included)."""
    width = (high - low).clamp_min(torch.finfo(torch.float64).tiny)
    index = torch.floor((values - low) / width * num_bins).long()
    return index.clamp_(0, num_bins - 1)


def reduce_histograms(values: Optional[torch.Tensor], group=None, num_bins: int = NUM_BINS) -> List[Histogram]:
    """Histograms of each column of `values` [n, k] over all ranks of `group` (one per column).

    A rank with no tokens passes None or an empty tensor. Non-finite values are left out. Must be called by
    every rank of `group`.

    Collectives on `group` (none without torch.distributed): one all-reduce MAX of the packed
    [2k] (-min, max), then one all-reduce SUM of the packed [k, num_bins + 3] (counts, n, sum, sum of
    squares), both float64.
    """
    columns = len(QUANTITIES) if values is None else values.shape[1]
    if values is None:
        values = torch.zeros(0, columns, dtype=torch.float64)
    values = values.detach().to(torch.float64).cpu()
    finite = torch.isfinite(values).all(dim=1)
    values = values[finite]  # [n, k]
    if values.shape[0]:
        extremes = torch.cat([-values.min(dim=0).values, values.max(dim=0).values])  # [2k]
    else:
        extremes = torch.full((2 * columns,), float("-inf"), dtype=torch.float64)
    distributed = dist.is_initialized()
    if distributed:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    low, high = -extremes[:columns], extremes[columns:]  # [k] global min and max

    packed = torch.zeros(columns, num_bins + 3, dtype=torch.float64)
    for column in range(columns):
        if not torch.isfinite(low[column]):
            continue  # no token anywhere: an empty histogram
        column_values = values[:, column]
        index = bin_indices(column_values, low[column], high[column], num_bins)
        packed[column, :num_bins] = torch.bincount(index, minlength=num_bins).to(torch.float64)
        packed[column, num_bins] = column_values.numel()
        packed[column, num_bins + 1] = column_values.sum()
        packed[column, num_bins + 2] = (column_values * column_values).sum()
    if distributed:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)

    histograms = []
    for column in range(columns):
        count = float(packed[column, num_bins])
        if count == 0:
            histograms.append(Histogram(0.0, 0.0, 0.0, 0.0, 0.0, [], []))
            continue
        lo, hi = float(low[column]), float(high[column])
        if hi > lo:
            edges = torch.linspace(lo, hi, num_bins + 1, dtype=torch.float64)[1:].tolist()
            counts = packed[column, :num_bins].tolist()
        else:  # every token has the same value (cross-entropy weights): one bucket
            edges, counts = [hi], [count]
        histograms.append(Histogram(lo, hi, count, float(packed[column, num_bins + 1]),
                                    float(packed[column, num_bins + 2]), edges, counts))
    return histograms


def histogram_interval(interval: Optional[int], eval_interval: int, tensorboard_dir: Optional[str]) -> int:
    """The effective --log-entropy-histogram-interval: its value, or --eval-interval when unset and
    TensorBoard is written; 0 = off."""
    if interval is None:
        return eval_interval if tensorboard_dir else 0
    return interval
