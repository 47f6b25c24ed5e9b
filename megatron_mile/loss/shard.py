"""The per-shard steps both vocab-parallel loss paths are built from.

Each tensor-parallel rank holds a contiguous slice of the padded vocabulary ([..., V_padded/tp] logits, or
the [V_padded/tp, h] output-layer rows the fused path multiplies by). Per token, both paths
(megatron_mile.loss.vocab_parallel on given logits, megatron_mile.loss.fused_linear_cross_entropy on logits
it computes chunk by chunk) need the same sums over the WHOLE real vocabulary, shifted by the global
maximum m so that every rank's partial sums add up exactly:

    z_t = logit of the target - m           (owned by exactly one rank; zero elsewhere)
    S   = sum_v exp(z_v - m)                 (softmax denominator)
    T   = sum_v exp(z_v - m) * (z_v - m)     (entropy statistic, only when needed)
    U   = sum_v (z_v - m)                    (label smoothing's mean log-probability, only when needed)

then ce = log S - z_t, H = log S - T / S (the entropy of softmax(z) in nats; derivation in
docs/mile-loss.md), log Z = log S + m, mean_v log p_v = U / V - log S, the weight from the LossSpec, the
per-token loss l = (1 - s) ce - s mean_v log p_v + c (log Z)^2 (s = alpha V / (V - 1): label smoothing as
megatron-core defines it; c: z-loss), and its logit gradient

    d l / d z_v = (1 + 2 c log Z) p_v - (1 - s) [v == target] - s / V.

This module holds those steps once; the two paths differ only in where the logits come from and when the
gradient is formed. Logits of -inf (masked vocabulary entries) and the largest finite bf16 values give
finite statistics: p_v = 0 entries add 0 to S and T (the shifted logits are clamped to the lowest finite
float before T's product, so 0 * -inf never forms a NaN).

Communication: `all_reduce_max` (MAX of [N] fp32) and `all_reduce_statistics` (one SUM of the packed [k, N]
fp32) on the tensor-parallel group; a weighting that selects among the micro-batch's tokens
(megatron_mile.loss.selection) adds its own collectives on the TokenScope's group (data parallel), inside
`token_losses`; nothing else here communicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_mile.loss import selection
from megatron_mile.parallel import megatron_group_or_none
from megatron_mile.loss.spec import LossSpec, TokenScope, TokenStatistics

# Targets equal to this id take no part in the loss (ce = 0, weight = 0, zero gradient), as in
# torch.nn.functional.cross_entropy. Megatron's data pipeline uses a loss mask instead; both work.
DEFAULT_IGNORE_INDEX = -100

# Rows of the packed per-token statistics (one all-reduce SUM carries them all); the optional rows follow
# (StatisticsLayout).
TARGET_LOGIT, SUM_EXP = 0, 1

# z - m is clamped here before T = sum e (z - m): exp of it is 0 and 0 * it is 0, where -inf would give NaN.
_LOWEST = torch.finfo(torch.float32).min


def tp_group_or_default(tp_group):
    """`tp_group`, else megatron's tensor-parallel group, else None (a single process)."""
    return tp_group if tp_group is not None else megatron_group_or_none("tensor")


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [vocab_start, vocab_start + partition) of the padded vocabulary.

    `owned` counts its columns that belong to the real vocabulary: padding at or beyond vocab_size takes no
    part in the max, the sums or the gradient, so results depend neither on the padding nor on the TP size.
    """

    tp_group: object
    rank: int
    tp_size: int
    partition: int  # V_padded / tp, the same on every rank
    vocab_size: int  # the real vocabulary V

    @classmethod
    def of(cls, partition: int, vocab_size: Optional[int], tp_group, what: str = "logits.size(-1)") -> "VocabShard":
        """The shard of a `partition`-wide slice on `tp_group` (None: megatron's group, or one process).

        vocab_size None means no padding (tp * partition). Raises ValueError when vocab_size does not fit.
        """
        tp_group = tp_group_or_default(tp_group)
        rank, tp_size = (0, 1) if tp_group is None else (dist.get_rank(tp_group), dist.get_world_size(tp_group))
        padded = partition * tp_size
        vocab_size = padded if vocab_size is None else int(vocab_size)
        if not (0 < vocab_size <= padded):
            raise ValueError(
                f"vocab_size={vocab_size} must be in [1, {padded}] = tp_size * {what}; pass the real (unpadded) "
                "vocabulary size, or check that the tensor-parallel group matches the one that split the vocabulary"
            )
        return cls(tp_group, rank, tp_size, partition, vocab_size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.partition

    @property
    def owned(self) -> int:
        return max(0, min(self.partition, self.vocab_size - self.vocab_start))


def validate_targets(target: torch.Tensor, expected_shape, vocab_size: int, ignore_index: Optional[int],
                     against: str) -> None:
    """Raise ValueError naming the problem: target must be integer ids [s, b] in [0, vocab_size) or ignored.

    `expected_shape` is the input's shape without its last dimension; `against` names that input in the
    message (e.g. "logits [s, b, V/tp]").
    """
    if tuple(target.shape) != tuple(expected_shape):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the {against.split()[0]} shape without its last "
            f"dimension {tuple(expected_shape)} ({against}, target [s, b])"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if target.numel() == 0:
        return
    valid = target if ignore_index is None else target[target != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        bad = valid[(valid < 0) | (valid >= vocab_size)][0].item()
        raise ValueError(
            f"target contains id {bad}, outside the vocabulary [0, {vocab_size}); check the tokenizer and "
            f"--vocab-size (ignored positions may use ignore_index={ignore_index})"
        )


class ShardTargets(NamedTuple):
    """Where each token's target lies on this shard. All [N]."""

    local: torch.Tensor  # int64 column of the target in this shard; 0 where it is not here
    here: torch.Tensor  # bool: this rank owns the target column (never for ignored tokens)
    ignored: Optional[torch.Tensor]  # bool: target == ignore_index; None without an ignore_index


def targets_on_shard(target: torch.Tensor, shard: VocabShard, ignore_index: Optional[int]) -> ShardTargets:
    """Locate the targets [N] (global ids) on this shard. No communication."""
    ignored = target == ignore_index if ignore_index is not None else None
    local = target - shard.vocab_start
    here = (local >= 0) & (local < shard.owned)
    if ignored is not None:
        here &= ~ignored
    local = torch.where(here, local, torch.zeros_like(local))
    return ShardTargets(local, here, ignored)


@dataclass(frozen=True)
class StatisticsLayout:
    """Which optional rows the packed [k, N] statistics hold: T (entropy) and U (sum of shifted logits)."""

    entropy: bool
    logit_sum: bool

    @classmethod
    def of(cls, spec: LossSpec, want_entropy: bool) -> "StatisticsLayout":
        return cls(spec.needs_entropy or want_entropy, spec.needs_logit_sum)

    @property
    def rows(self) -> int:
        return 2 + int(self.entropy) + int(self.logit_sum)

    @property
    def entropy_row(self) -> Optional[int]:
        return 2 if self.entropy else None

    @property
    def logit_sum_row(self) -> Optional[int]:
        return 2 + int(self.entropy) if self.logit_sum else None


def new_statistics(num_tokens: int, layout: StatisticsLayout, device) -> torch.Tensor:
    """Zeroed packed statistics [k, N] fp32: rows TARGET_LOGIT, SUM_EXP, then the layout's optional rows."""
    return torch.zeros((layout.rows, num_tokens), dtype=torch.float32, device=device)


def put_target_logit(stats: torch.Tensor, shifted_target_logit: torch.Tensor, targets: ShardTargets) -> None:
    """stats[TARGET_LOGIT] = z_target - m where this rank owns the target, 0 elsewhere (the SUM assembles it)."""
    value = torch.where(targets.here, shifted_target_logit, torch.zeros_like(shifted_target_logit))
    stats[TARGET_LOGIT].copy_(value)


def exp_sums_(shifted: torch.Tensor, exps: torch.Tensor, stats: torch.Tensor, layout: StatisticsLayout) -> None:
    """One chunk's sums: S = sum exp(shifted) and, as the layout asks, T = sum exp(shifted) * shifted and
    U = sum shifted, into the chunk's columns `stats` [k, n] of the packed statistics.

    shifted [n, v] = z - m, fp32, OVERWRITTEN (clamped, then exps * shifted) when T is asked for; exps [n, v]
    fp32 output (any fp32 storage the caller wants exp(z - m) kept in).
    """
    if layout.logit_sum:
        torch.sum(shifted, dim=-1, out=stats[layout.logit_sum_row])
    if layout.entropy:
        shifted.clamp_(min=_LOWEST)  # -inf (masked entries, overflowed differences) -> finite
    torch.exp(shifted, out=exps)
    torch.sum(exps, dim=-1, out=stats[SUM_EXP])
    if layout.entropy:
        shifted.mul_(exps)  # e * (z - m), in place: the shifted logits are not needed any more
        torch.sum(shifted, dim=-1, out=stats[layout.entropy_row])


def all_reduce_max(values: torch.Tensor, shard: VocabShard) -> None:
    """Collective 1: all-reduce MAX of the per-token local maxima [N] fp32 over the TP group (in place)."""
    if shard.tp_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=shard.tp_group)


def all_reduce_statistics(stats: torch.Tensor, shard: VocabShard) -> None:
    """Collective 2: ONE all-reduce SUM of the packed statistics [k, N] fp32 over the TP group (in place)."""
    if shard.tp_size > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=shard.tp_group)


@dataclass(frozen=True)
class TokenLosses:
    """Per-token results, fp32, the shape of the targets.

    loss: the training loss l (cross-entropy, with label smoothing and z-loss when the spec has them),
        carrying the gradient (where the path gives one).
    weight, entropy, ce, z_loss: detached. ce is the plain cross-entropy (equal to loss without smoothing or
        z-loss); z_loss is c (log Z)^2 (zeros without); entropy is an EMPTY tensor when it was neither needed
        by the weighting nor asked for.
    Ignored tokens (ignore_index) are 0 in every field.
    """

    loss: torch.Tensor
    weight: torch.Tensor
    entropy: torch.Tensor
    ce: torch.Tensor
    z_loss: torch.Tensor


def token_scope(spec: LossSpec, loss_mask: Optional[torch.Tensor], targets: ShardTargets, token_group
                ) -> Optional[TokenScope]:
    """The TokenScope of a weighting that needs one (else None): the counted tokens [N] (loss_mask > 0, None:
    all, and target not ignored) and the group holding the micro-batch's other tokens (None: megatron's
    data-parallel x context-parallel group, or this process alone). No communication."""
    if not spec.needs_token_scope:
        return None
    counted = torch.ones_like(targets.here) if loss_mask is None else loss_mask.reshape(-1) > 0
    if targets.ignored is not None:
        counted = counted & ~targets.ignored
    return TokenScope(counted, selection.token_group_or_default(token_group))


class ShardResults(NamedTuple):
    """token_losses' per-token values [N] fp32 for one call (or chunk), before ignore-masking."""

    loss: torch.Tensor
    ce: torch.Tensor
    weight: torch.Tensor
    entropy: Optional[torch.Tensor]
    z_loss: Optional[torch.Tensor]
    log_sum_exp: torch.Tensor  # log S, shifted by the max
    prob_scale: Optional[torch.Tensor]  # 1 + 2 c log Z: the z-loss's factor on the softmax in the gradient


def token_losses(stats: torch.Tensor, spec: LossSpec, shard: "VocabShard", logits_max: torch.Tensor,
                 layout: StatisticsLayout, scope: Optional[TokenScope] = None) -> ShardResults:
    """From the all-reduced packed statistics [k, N] and the global max m [N] to the per-token values.

    ce = log S - z_t; H = log S - T / S (clamped at 0 against rounding); log Z = log S + m; the loss
    l = (1 - s) ce - s (U / V - log S) + c (log Z)^2 (module docstring); weight = spec.token_weight of the
    model's own statistics (and, for a selection, of the `scope`: token_scope). No communication, except a
    selection weighting's on the scope's group (megatron_mile.loss.selection).
    """
    sum_exp = stats[SUM_EXP]
    log_sum_exp = torch.log(sum_exp)  # [N]
    ce = log_sum_exp - stats[TARGET_LOGIT]
    entropy = None
    if layout.entropy:
        # H = log S - T / S >= 0; clamp the rounding error that can make it a hair negative.
        entropy = (log_sum_exp - stats[layout.entropy_row] / sum_exp).clamp_(min=0.0)
    log_z = log_sum_exp + logits_max
    statistics = TokenStatistics(ce, entropy, shard.vocab_size, log_z=log_z, max_prob=sum_exp.reciprocal(),
                                 scope=scope)
    weight = spec.token_weight(statistics)
    loss = ce
    if spec.label_smoothing > 0:
        vocab = shard.vocab_size
        smoothing = spec.label_smoothing * vocab / (vocab - 1)
        mean_log_prob = stats[layout.logit_sum_row] / vocab - log_sum_exp
        loss = (1.0 - smoothing) * ce - smoothing * mean_log_prob
    z_loss = prob_scale = None
    if spec.z_loss_coeff > 0:
        z_loss = spec.z_loss_coeff * log_z.square()
        loss = loss + z_loss
        prob_scale = 1.0 + (2.0 * spec.z_loss_coeff) * log_z
    if loss is ce:
        loss = ce.clone()  # the differentiable output must not share storage with the detached ce
    return ShardResults(loss, ce, weight, entropy, z_loss, log_sum_exp, prob_scale)


def target_and_uniform_scales(spec: LossSpec, vocab_size: int, scale: torch.Tensor, here: torch.Tensor):
    """The gradient's per-token terms for an upstream `scale` [N]: (subtracted at the owned target column,
    subtracted from every real column or None): (1 - s) scale [target here] and s scale / V."""
    if spec.label_smoothing > 0:
        smoothing = spec.label_smoothing * vocab_size / (vocab_size - 1)
        return (1.0 - smoothing) * scale * here.float(), (smoothing / vocab_size) * scale
    return scale * here.float(), None


def zero_ignored_(ignored: Optional[torch.Tensor], *per_token: Optional[torch.Tensor]) -> None:
    """Set ignored tokens' ce / weight / entropy [N] to 0 in place (None tensors are skipped)."""
    if ignored is None:
        return
    keep = (~ignored).float()
    for values in per_token:
        if values is not None:
            values.mul_(keep)


def softmax_grad_(exps: torch.Tensor, row_scale: torch.Tensor, target_scale: torch.Tensor,
                  local_target: torch.Tensor, uniform_scale: Optional[torch.Tensor] = None) -> None:
    """Turn exp(z - m) [n, v] into the logit gradient in place: row_scale * exp - target_scale [target]
    - uniform_scale.

    row_scale [n] multiplies each row (g (1 + 2 c log Z) / S normalises exp into the scaled softmax);
    target_scale [n] is subtracted at each token's target column `local_target` [n] (0 where the target is on
    another rank); uniform_scale [n] (label smoothing) from every column. See the module docstring.
    """
    exps.mul_(row_scale[:, None])
    if uniform_scale is not None:
        exps.sub_(uniform_scale[:, None])
    exps[torch.arange(exps.size(0), device=exps.device), local_target] -= target_scale
