"""From per-token (ce, weight) to the training loss, exactly and independently of how a batch is split.

docs/mile-loss.md fixes the loss of one optimizer step as

    L = sum_t(w_t * ce_t) / sum_t(w_t)      over every loss-masked token of the GLOBAL batch

(all micro-batches, all data-parallel ranks). Because w is detached, dL/dtheta = sum_t w_t dce_t/dtheta / W
with W = sum_t w_t a constant. So each micro-batch contributes two sums: the numerator (with gradient) and
the weight total (detached); gradients of the numerators are summed by gradient accumulation and the
data-parallel all-reduce, and divided once by the global W. This module provides those pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

# Columns of the packed statistics vector (one all-reduce SUM carries them all).
_WEIGHTED_CE, _WEIGHT, _CE, _TOKENS, _ENTROPY = range(5)
_NUM_SUMS = 5


@dataclass
class MicroBatchLoss:
    """What one micro-batch contributes to the step's loss.

    weighted_ce_sum: sum(mask * w * ce), scalar WITH gradient: the quantity to backpropagate.
    sums: detached fp32 [5]: sum(mask*w*ce), sum(mask*w), sum(mask*ce), sum(mask), sum(mask*H).
    weight_min / weight_max: detached scalars over the masked tokens (+inf / -inf if there are none).
    """

    weighted_ce_sum: torch.Tensor
    sums: torch.Tensor
    weight_min: torch.Tensor
    weight_max: torch.Tensor


def reduce_micro_batch(
    ce: torch.Tensor,
    weight: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> MicroBatchLoss:
    """Reduce per-token ce / weight [s, b] (or [b, s]) of one micro-batch to its MicroBatchLoss.

    No communication. `loss_mask` (same shape, 0/1) removes positions; None keeps all of them.
    """
    if ce.shape != weight.shape:
        raise ValueError(f"ce shape {tuple(ce.shape)} and weight shape {tuple(weight.shape)} differ")
    mask = torch.ones_like(ce) if loss_mask is None else loss_mask.to(ce.dtype)
    if mask.shape != ce.shape:
        raise ValueError(f"loss_mask shape {tuple(mask.shape)} must equal ce shape {tuple(ce.shape)}")
    weight = weight.detach() * mask
    weighted_ce_sum = (weight * ce).sum()
    with torch.no_grad():
        sums = torch.stack(
            [
                weighted_ce_sum.detach(),
                weight.sum(),
                (mask * ce.detach()).sum(),
                mask.sum(),
                (mask * entropy).sum() if entropy is not None and entropy.numel() else ce.new_zeros(()),
            ]
        ).float()
        selected = mask > 0
        if bool(selected.any()):
            weight_min, weight_max = weight[selected].min(), weight[selected].max()
        else:
            weight_min, weight_max = ce.new_tensor(float("inf")), ce.new_tensor(float("-inf"))
    return MicroBatchLoss(weighted_ce_sum, sums, weight_min.float(), weight_max.float())


@dataclass
class StepLoss:
    """The step's global statistics, identical on every rank after `all_reduce_step_loss`."""

    loss: float  # sum(w * ce) / sum(w): the training objective
    lm_loss: float  # sum(ce) / tokens: plain cross-entropy, comparable across loss types
    weight_sum: float  # W, the normaliser the gradients are divided by
    tokens: float
    mean_entropy: float
    weight_mean: float
    weight_min: float
    weight_max: float


def all_reduce_step_loss(parts: Iterable[MicroBatchLoss], group=None) -> StepLoss:
    """Combine every micro-batch of this rank, then all ranks of `group` (data parallel), into StepLoss.

    Collectives on `group` (skipped when it is None and torch.distributed is not initialised):
    all-reduce SUM of the packed [5] sums, all-reduce MIN and MAX of the weight extremes.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("all_reduce_step_loss needs at least one micro-batch")
    sums = torch.stack([p.sums for p in parts]).sum(0)
    weight_min = torch.stack([p.weight_min for p in parts]).min()
    weight_max = torch.stack([p.weight_max for p in parts]).max()
    if dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(weight_min, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(weight_max, op=dist.ReduceOp.MAX, group=group)
    values = sums.tolist()
    tokens = values[_TOKENS]
    weight_sum = values[_WEIGHT]
    return StepLoss(
        loss=values[_WEIGHTED_CE] / weight_sum if weight_sum > 0 else float("nan"),
        lm_loss=values[_CE] / tokens if tokens > 0 else float("nan"),
        weight_sum=weight_sum,
        tokens=tokens,
        mean_entropy=values[_ENTROPY] / tokens if tokens > 0 else float("nan"),
        weight_mean=weight_sum / tokens if tokens > 0 else float("nan"),
        weight_min=float(weight_min),
        weight_max=float(weight_max),
    )
