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
_WEIGHTED_LOSS, _WEIGHT, _CE, _TOKENS, _ENTROPY, _Z_LOSS = range(6)
_NUM_SUMS = 6


@dataclass
class MicroBatchLoss:
    """What one micro-batch contributes to the step's loss.

    weighted_loss_sum: sum(mask * w * l) of the per-token loss l, scalar WITH gradient: what to backpropagate.
    sums: detached fp32 [6]: sum(mask*w*l), sum(mask*w), sum(mask*ce), sum(mask), sum(mask*H), sum(mask*z).
    weight_min / weight_max: detached scalars over the masked tokens (+inf / -inf if there are none).
    """

    weighted_loss_sum: torch.Tensor
    sums: torch.Tensor
    weight_min: torch.Tensor
    weight_max: torch.Tensor


def reduce_micro_batch(
    loss: torch.Tensor,
    weight: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    ce: Optional[torch.Tensor] = None,
    z_loss: Optional[torch.Tensor] = None,
) -> MicroBatchLoss:
    """Reduce one micro-batch's per-token values [s, b] (or [b, s]) to its MicroBatchLoss.

    loss: the per-token training loss l (with gradient); weight: its detached weight; ce: the plain
    cross-entropy for `lm loss` (default: loss, i.e. no label smoothing or z-loss); entropy and z_loss:
    logged means (None or empty: 0). No communication. `loss_mask` (same shape, 0/1) removes positions;
    None keeps all of them.
    """
    if loss.shape != weight.shape:
        raise ValueError(f"loss shape {tuple(loss.shape)} and weight shape {tuple(weight.shape)} differ")
    mask = torch.ones_like(loss) if loss_mask is None else loss_mask.to(loss.dtype)
    if mask.shape != loss.shape:
        raise ValueError(f"loss_mask shape {tuple(mask.shape)} must equal loss shape {tuple(loss.shape)}")
    weight = weight.detach() * mask
    weighted_loss_sum = (weight * loss).sum()
    ce = loss if ce is None else ce

    def masked_sum(values: Optional[torch.Tensor]) -> torch.Tensor:
        return (mask * values).sum() if values is not None and values.numel() else loss.new_zeros(())

    with torch.no_grad():
        sums = torch.stack(
            [weighted_loss_sum.detach(), weight.sum(), masked_sum(ce.detach()), mask.sum(), masked_sum(entropy),
             masked_sum(z_loss)]
        ).float()
        selected = mask > 0
        if bool(selected.any()):
            weight_min, weight_max = weight[selected].min(), weight[selected].max()
        else:
            weight_min, weight_max = loss.new_tensor(float("inf")), loss.new_tensor(float("-inf"))
    return MicroBatchLoss(weighted_loss_sum, sums, weight_min.float(), weight_max.float())


@dataclass
class StepLoss:
    """The step's global statistics, identical on every rank after `all_reduce_step_loss`."""

    loss: float  # sum(w * l) / sum(w): the training objective
    lm_loss: float  # sum(ce) / tokens: plain cross-entropy, comparable across loss types
    weight_sum: float  # W, the normaliser the gradients are divided by
    tokens: float
    mean_entropy: float
    weight_mean: float
    weight_min: float
    weight_max: float
    z_loss: float = 0.0  # sum(c (log Z)^2) / tokens: the z-loss's mean share of the loss (0 without)


def all_reduce_step_loss(parts: Iterable[MicroBatchLoss], group=None) -> StepLoss:
    """Combine every micro-batch of this rank, then all ranks of `group` (data parallel), into StepLoss.

    Collectives on `group` (skipped when it is None and torch.distributed is not initialised):
    all-reduce SUM of the packed [6] sums, all-reduce MIN and MAX of the weight extremes.
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
        loss=values[_WEIGHTED_LOSS] / weight_sum if weight_sum > 0 else float("nan"),
        lm_loss=values[_CE] / tokens if tokens > 0 else float("nan"),
        weight_sum=weight_sum,
        tokens=tokens,
        mean_entropy=values[_ENTROPY] / tokens if tokens > 0 else float("nan"),
        weight_mean=weight_sum / tokens if tokens > 0 else float("nan"),
        weight_min=float(weight_min),
        weight_max=float(weight_max),
        z_loss=values[_Z_LOSS] / tokens if tokens > 0 else float("nan"),
    )
