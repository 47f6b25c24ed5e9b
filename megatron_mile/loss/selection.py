"""Token selection: keep the hardest fraction of a micro-batch's loss-masked tokens (weight 1, the rest 0).

The selection weightings of megatron_mile.loss.spec (`entropy_selection`, `ce_selection`) score every token
(its entropy H, or its cross-entropy ce) and keep the top `fraction` of the COUNTED tokens (loss_mask > 0,
target not ignored) of one micro-batch, over every rank that holds a part of that micro-batch. Sorting the
scores of all those ranks would need an all-gather of every score; instead the threshold comes from a
fixed-size histogram, so the communication does not grow with the number of tokens:

    upper  = log V (entropy: H lies in [0, log V])          or  all-reduce MAX of the largest counted ce
    width  = upper / SELECTION_BINS;   bin(score) = min(floor(score / width), SELECTION_BINS - 1)
    counts = all-reduce SUM of this rank's per-bin counts of counted tokens       [SELECTION_BINS] int64
    needed = ceil(fraction * n)        (n = the global count of counted tokens, at least one token kept)
    j      = the highest bin whose count from the top (bins j .. SELECTION_BINS - 1) reaches `needed`
    keep   = counted and bin(score) >= j        (threshold: the lower edge j * width of bin j)

Accuracy: bin j holds the needed-th largest score (the exact top-`needed` cutoff c), so the kept tokens are
the exact selection (every score >= c, ties included) plus the tokens of bin j that score below c, all within
one bin width of c. The kept count is >= needed and exceeds it by at most (count of bin j) - 1; the kept
fraction is >= `fraction`. Bin widths: log(32000) / 4096 ~ 0.0025 nats for the entropy; max ce / 4096 for
the cross-entropy (~0.005 nats at a largest ce of 20).

Scope: the ranks of `group` must together hold exactly the tokens to select among, and call this in the same
order. The model passes the data-parallel x context-parallel group of the last pipeline stage: micro-batch i
of a step is computed by every DP rank in the same schedule position, and its scores are already identical on
the tensor-parallel ranks (after the loss's SUM all-reduce), so TP ranks need no collective of their own.
With gradient accumulation every micro-batch has its own threshold (docs/mile-loss.md says why).

Non-finite scores (a ce of +inf when p_target underflows to 0, NaN) fall in the top bin: always kept.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_mile.parallel import megatron_group_or_none

# Histogram bins of the threshold: 4096 int64 counts = 32 KiB per all-reduce, and a bin width of
# ~0.0025 nats for the entropy at vocabulary 32000.
SELECTION_BINS = 4096

# fraction * n is rounded up to whole tokens; the tolerance keeps e.g. 0.6 * 10 = 6.000000000000001 at 6.
_ROUNDING_TOLERANCE = 1e-6


def token_group_or_default(group):
    """`group`, else megatron's data-parallel x context-parallel group, else None (this process alone)."""
    return group if group is not None else megatron_group_or_none("data")


def _spans_ranks(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def score_bins(scores: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The histogram bin [N] int64 of each score [N] fp32 over [0, upper] (upper: fp32 scalar tensor).

    Scores at or above `upper`, +inf and NaN land in the top bin, negative ones in bin 0; upper <= 0 puts
    every score in bin 0.
    """
    top = SELECTION_BINS - 1
    per_unit = torch.where(upper > 0, SELECTION_BINS / upper, torch.zeros_like(upper))  # 1 / bin width
    position = (scores.float() * per_unit).nan_to_num(nan=float(top), posinf=float(top), neginf=0.0)
    return position.clamp_(0.0, float(top)).floor_().long()


def top_fraction_mask(scores: torch.Tensor, counted: torch.Tensor, fraction: float, group=None,
                      upper: Optional[float] = None) -> torch.Tensor:
    """Which tokens to keep: the `fraction` highest `scores` among the `counted` tokens of every rank of `group`.

    Args:
        scores: [N] fp32 per-token scores (>= 0), the same on every tensor-parallel rank.
        counted: [N] bool, the tokens to select among (loss_mask > 0, target not ignored).
        fraction: k in (0, 1]; 1 keeps every counted token without communicating.
        group: the process group whose ranks hold the rest of the tokens (None: this process alone).
        upper: a known bound on the scores (log V for the entropy); None: the all-reduced largest finite
            counted score.

    Returns:
        keep [N] bool: counted tokens whose score falls in the threshold bin or above (module docstring:
        ties and the threshold bin's other tokens are all kept). Never a token that is not counted.

    Collectives on `group` (none when it is None or has one rank): with upper None, an all-reduce MAX of
    one fp32; then one all-reduce SUM of [SELECTION_BINS] int64.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return counted.clone()
    spans = _spans_ranks(group)
    if upper is None:
        scores = scores.float()
        finite = torch.where(counted & torch.isfinite(scores), scores, torch.zeros_like(scores))
        bound = finite.amax().reshape(1) if finite.numel() else finite.new_zeros(1)
        if spans:
            dist.all_reduce(bound, op=dist.ReduceOp.MAX, group=group)
        bound = bound[0]
    else:
        bound = torch.tensor(float(upper), dtype=torch.float32, device=scores.device)
    bins = score_bins(scores, bound)  # [N]
    # Uncounted tokens go to an extra bin that is dropped; scatter_add_ (unlike bincount or boolean
    # indexing) needs no device-to-host sync.
    slots = bins.masked_fill(~counted, SELECTION_BINS)
    counts = torch.zeros(SELECTION_BINS + 1, dtype=torch.int64, device=scores.device)
    counts = counts.scatter_add_(0, slots, torch.ones_like(slots))[:SELECTION_BINS].contiguous()  # [B]
    if spans:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    from_top = counts.flip(0).cumsum(0).flip(0)  # [B]: counted tokens in bins j .. B - 1
    needed = torch.ceil(fraction * counts.sum().double() - _ROUNDING_TOLERANCE).clamp(min=1)
    # from_top is non-increasing: the bins where it reaches `needed` are 0 .. j.
    threshold_bin = (from_top >= needed).sum() - 1  # -1 only when nothing is counted anywhere
    return counted & (bins >= threshold_bin)
