"""Cross-entropy, focal and MiLe losses computed inside the vocab-parallel cross-entropy.

Each tensor-parallel rank holds logits for a contiguous slice of the (padded) vocabulary:
`logits` is [s, b, V_padded/tp]. Per token the pass forms the shifted sums z_t, S and (when the weighting
needs the entropy) T of megatron_mile.loss.shard over the WHOLE vocabulary, then ce = log S - z_t,
H = log S - T / S and the detached weight of the LossSpec (megatron_mile.loss.spec):

    MiLe:           w = (sigma + H) ** gamma      (optionally 1 where H / ln(V) < entropy_threshold)
    focal:          w = (1 - p_target) ** gamma
    cross-entropy:  w = 1
    selections:     w = 1 for the hardest share of the micro-batch's counted tokens, else 0
                    (entropy_selection, ce_selection: megatron_mile.loss.selection)

Communication per call, on the tensor-parallel group: forward issues exactly two all-reduces, a MAX of
the per-token local maxima ([N] fp32) and ONE SUM of the packed statistics ([k, N] fp32, k = 3 for MiLe,
2 otherwise); backward issues none. The selection weightings add their threshold's collectives on the
data-parallel group only (vocab_parallel_weighted_cross_entropy).

Memory: by default the caller's logits are never modified and never copied whole. The forward pass walks
the logits in chunks of tokens through small fp32 scratch buffers (each 4 MiB, so they stay in cache) and
keeps only per-token vectors. Saved for backward: a reference to the logits (which the caller holds anyway),
the per-token log-sum-exp, the owned-target indices and the incoming mask: O(tokens) beyond the logits.
Backward recomputes the softmax chunk by chunk and writes the gradient straight into one tensor of the
logits' dtype, so bf16 logits never get an fp32 copy of the full [s, b, V/tp] tensor.

A caller that gives up contiguous fp32 logits (reuse_logits_for_grad, as the model's loss hook does) lets the
forward pass write exp(z - m) over them and the backward pass turn that into the gradient in place with
one multiply per element (no second exp), as megatron-core's cross-entropy does: no full-size
allocation at all, and one pass less over the logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mile.loss import shard as shard_steps
from megatron_mile.loss.shard import DEFAULT_IGNORE_INDEX, TokenLosses, VocabShard
from megatron_mile.loss.spec import CROSS_ENTROPY, LossSpec

# Elements per fp32 scratch buffer: 2**20 floats = 4 MiB (two buffers: 8 MiB), small enough to stay in the
# last-level cache while a chunk of tokens is subtracted, exponentiated and reduced, large enough that the
# per-op dispatch cost (five small ops per chunk) stays small. Measured on a 2-core CPU, vocab 32000, 4096
# tokens: 2**18 took 143 ms for the forward statistics with entropy, 2**20 99 ms, 2**22 167 ms.
CHUNK_ELEMENTS = 1 << 20


def _rows_per_chunk(columns: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(columns, 1))


class _VocabParallelWeightedCrossEntropy(torch.autograd.Function):
    """The per-token loss l (ce = log S - z_t, with label smoothing and z-loss as the spec says) and its
    detached weight, entropy, plain ce and z-loss; see the module docstring and megatron_mile.loss.shard.

    Forward collectives (shard.tp_group): all-reduce MAX [N], then all-reduce SUM [k, N]; a selection
    weighting adds its own on token_group (megatron_mile.loss.selection). Backward: none.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,  # [s, b, v/tp]
        target: torch.Tensor,  # [s, b]
        spec: LossSpec,
        shard: VocabShard,
        ignore_index: Optional[int],
        want_entropy: bool,
        reuse_logits_for_grad: bool,
        loss_mask: Optional[torch.Tensor],  # [s, b] or None: the tokens a selection weighting selects among
        token_group,  # the group holding the micro-batch's other tokens (selection weightings only)
    ):
        partition = shard.partition
        owned = shard.owned
        logits_2d = logits.reshape(-1, partition)  # [N, v/tp]; a view when logits is contiguous
        num_tokens = logits_2d.size(0)
        device = logits.device

        # --- 1. global max (collective 1: MAX) ---
        if owned > 0:
            logits_max = logits_2d[:, :owned].amax(dim=-1).float()  # [N]
        else:
            logits_max = torch.full((num_tokens,), float("-inf"), device=device)
        shard_steps.all_reduce_max(logits_max, shard)

        layout = shard_steps.StatisticsLayout.of(spec, want_entropy)
        stats = shard_steps.new_statistics(num_tokens, layout, device)  # [k, N]

        # Target logit, picked on the rank that owns it. Picked before step 2, which may overwrite the logits.
        targets = shard_steps.targets_on_shard(target.reshape(-1), shard, ignore_index)
        picked = logits_2d.gather(1, targets.local[:, None]).squeeze(1).float() - logits_max
        shard_steps.put_target_logit(stats, picked, targets)

        # When the caller gives the fp32 logits up (reuse_logits_for_grad), exp(z - m) is written over them
        # and backward only rescales it: one pass over the logits instead of recomputing sub + exp.
        # That needs logits_2d to be the logits' own storage, i.e. contiguous logits.
        keep_exps = reuse_logits_for_grad and logits.dtype == torch.float32 and logits.is_contiguous()

        # --- 2. one pass over the logits in chunks: S and (when needed) T and U ---
        if owned > 0 and num_tokens > 0:
            rows = min(_rows_per_chunk(owned), num_tokens)
            shifted = torch.empty((rows, owned), dtype=torch.float32, device=device)
            exps = None if keep_exps else torch.empty_like(shifted)
            for start in range(0, num_tokens, rows):
                end = min(start + rows, num_tokens)
                n = end - start
                z = shifted[:n]
                torch.sub(logits_2d[start:end, :owned], logits_max[start:end, None], out=z)
                shard_steps.exp_sums_(
                    z, logits_2d[start:end, :owned] if keep_exps else exps[:n], stats[:, start:end], layout
                )

        # --- 3. collective 2: ONE SUM of the packed statistics ---
        shard_steps.all_reduce_statistics(stats, shard)
        scope = shard_steps.token_scope(spec, loss_mask, targets, token_group)
        out = shard_steps.token_losses(stats, spec, shard, logits_max, layout, scope)
        shard_steps.zero_ignored_(targets.ignored, out.loss, out.ce, out.weight, out.entropy, out.z_loss)

        # Backward turns row r of the saved logits into softmax with one number per token: the log-sum-exp
        # to subtract (logits kept) or 1 / S to multiply by (logits overwritten with exp(z - m)).
        sum_exp = stats[shard_steps.SUM_EXP]
        softmax_from_saved = sum_exp.reciprocal() if keep_exps else logits_max + out.log_sum_exp  # [N]
        ctx.save_for_backward(logits, softmax_from_saved, targets.local, targets.here, targets.ignored,
                              out.prob_scale)
        ctx.spec, ctx.vocab_size = spec, shard.vocab_size
        ctx.owned = owned
        ctx.keep_exps = keep_exps
        ctx.reuse_logits_for_grad = reuse_logits_for_grad and logits.dtype == torch.float32
        shape = target.shape
        empty = torch.empty(0, device=device)
        detached = [out.weight.view(shape), out.entropy.view(shape) if out.entropy is not None else empty,
                    out.ce.view(shape), out.z_loss.view(shape) if out.z_loss is not None else empty]
        ctx.mark_non_differentiable(*detached)
        return (out.loss.view(shape), *detached)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_detached):
        """d l / d z_v = (1 + 2 c log Z) p_v - (1 - s) [v == target] - s / V, times the incoming gradient
        (shard.py). No communication."""
        logits, softmax_from_saved, local_target, target_here, ignored, prob_scale = ctx.saved_tensors
        owned = ctx.owned
        partition = logits.size(-1)
        logits_2d = logits.reshape(-1, partition)  # [N, v/tp]
        num_tokens = logits_2d.size(0)
        grad_scale = grad_loss.reshape(-1).float()  # [N]
        if ignored is not None:
            grad_scale = grad_scale.masked_fill(ignored, 0.0)
        # The one full-size allocation of the loss, in the logits' dtype; none at all when the caller lets
        # us overwrite fp32 logits it no longer needs (megatron's in-place pattern, opt-in).
        grad = logits_2d if ctx.reuse_logits_for_grad else torch.empty_like(logits_2d)
        if owned < partition:
            grad[:, owned:] = 0  # padded vocabulary columns take no part
        # [N] each: subtracted at the owned target, and (label smoothing) from every real column.
        target_grad, uniform_grad = shard_steps.target_and_uniform_scales(ctx.spec, ctx.vocab_size, grad_scale,
                                                                          target_here)
        prob_grad = grad_scale if prob_scale is None else grad_scale * prob_scale  # [N]: the softmax's factor
        if owned > 0 and num_tokens > 0 and ctx.keep_exps:
            # grad is logits_2d, which holds exp(z - m): softmax * prob_grad = that * (prob_grad / S).
            # One streaming multiply, then the target correction; nothing to recompute, so no chunks.
            shard_steps.softmax_grad_(grad[:, :owned], softmax_from_saved * prob_grad, target_grad, local_target,
                                      uniform_grad)
        elif owned > 0 and num_tokens > 0:
            rows = min(_rows_per_chunk(owned), num_tokens)
            # fp32 logits: compute straight into the gradient rows; otherwise in an fp32 scratch buffer.
            direct = logits.dtype == torch.float32 and owned == partition
            scratch = None if direct else torch.empty((rows, owned), dtype=torch.float32, device=logits.device)
            for start in range(0, num_tokens, rows):
                end = min(start + rows, num_tokens)
                out = grad[start:end] if direct else scratch[: end - start]
                torch.sub(logits_2d[start:end, :owned], softmax_from_saved[start:end, None], out=out)
                out.exp_()  # exp(z - log Z) = softmax, so the row scale is the softmax's factor alone
                shard_steps.softmax_grad_(out, prob_grad[start:end], target_grad[start:end], local_target[start:end],
                                          None if uniform_grad is None else uniform_grad[start:end])
                if not direct:
                    grad[start:end, :owned].copy_(out)
        return grad.view_as(logits), None, None, None, None, None, None, None, None


def _validate_logits(logits: torch.Tensor) -> None:
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor (fp32 or bf16), got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., vocab_shard], got shape {tuple(logits.shape)}")


def vocab_parallel_weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    spec: LossSpec = CROSS_ENTROPY,
    vocab_size: Optional[int] = None,
    ignore_index: Optional[int] = DEFAULT_IGNORE_INDEX,
    tp_group=None,
    compute_entropy: bool = False,
    reuse_logits_for_grad: bool = False,
    loss_mask: Optional[torch.Tensor] = None,
    token_group=None,
) -> TokenLosses:
    """Per-token loss, its detached `spec` weight, entropy, cross-entropy and z-loss, vocabulary split over TP.

    The general form behind vocab_parallel_mile / vocab_parallel_focal / vocab_parallel_cross_entropy.

    Args:
        logits: [s, b, V_padded/tp] this rank's vocabulary shard, fp32 or bf16. Never modified, unless
            reuse_logits_for_grad.
        target: [s, b] global token ids in [0, vocab_size), or ignore_index.
        spec: the loss (megatron_mile.loss.spec.LossSpec): which weighting, with which parameters, and
            optionally label smoothing and z-loss.
        vocab_size: the real vocabulary; columns at or beyond it (padding) are excluded. Default: tp *
            logits.size(-1), i.e. no padding.
        tp_group: the tensor-parallel group; defaults to megatron's, or a single process when megatron's
            parallel state is not initialised.
        compute_entropy: compute H even when the weighting does not need it (one extra in-cache
            multiply-add per logit for cross-entropy and focal; free for MiLe).
        reuse_logits_for_grad: opt-in, fp32 logits only. The caller gives the logits up: forward
            overwrites their real-vocabulary columns with exp(z - max) and backward turns that into the
            gradient in the same storage, as megatron-core's cross-entropy does, saving one [s, b, V/tp]
            fp32 allocation and the backward pass's exp. Only for callers that never read the logits
            after this call (a model's loss hook whose logits come straight from the output layer).
            Non-contiguous fp32 logits are left intact and backward recomputes the softmax into them.
        loss_mask: [s, b], > 0 where the token counts (None: every token). Read only by a weighting that
            selects among the micro-batch's tokens (spec.needs_token_scope: entropy_selection,
            ce_selection), which selects among the counted, not ignored tokens; the returned values are
            never multiplied by it.
        token_group: for those weightings, the process group whose ranks hold the rest of the micro-batch
            (training: the data-parallel x context-parallel group); default megatron's, or this process alone
            when megatron's parallel state is not initialised.

    Returns:
        TokenLosses (megatron_mile.loss.shard): loss [s, b] fp32 with gradient to `logits` (the
        cross-entropy, label-smoothed and with the z-loss when the spec has them); weight, ce and z_loss
        [s, b] fp32 detached; entropy [s, b] fp32 detached when computed (the weighting needs it, or
        compute_entropy), else an empty tensor. Ignored positions are 0 in every field. Logits of -inf
        (masked entries) give finite ce / entropy / weight over the remaining entries.

    Raises:
        ValueError naming the argument for non-float logits, a target of the wrong shape, dtype or range,
        a loss_mask of another shape than the target, or a vocab_size that does not fit the shards.

    Collectives on tp_group (forward only): all-reduce MAX of [N] fp32, then one all-reduce SUM of
    [k, N] fp32 (k = 2, plus 1 when the entropy is computed, plus 1 with label smoothing). Backward: none.
    Selection weightings add, on token_group only (none when it has one rank, or with a fraction of 1): an
    all-reduce SUM of [4096] int64 (the score histogram), preceded for ce_selection by an all-reduce MAX of
    one fp32 (megatron_mile.loss.selection).
    """
    _validate_logits(logits)
    shard = VocabShard.of(logits.size(-1), vocab_size, tp_group)
    shard_steps.validate_targets(target, logits.shape[:-1], shard.vocab_size, ignore_index, "logits [s, b, V/tp]")
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(target.shape):
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal the target shape {tuple(target.shape)}")
    return TokenLosses(*_VocabParallelWeightedCrossEntropy.apply(
        logits, target, spec, shard, ignore_index, compute_entropy, reuse_logits_for_grad, loss_mask, token_group
    ))


def vocab_parallel_mile(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 1.0,
    sigma: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group=None,
    entropy_threshold: Optional[float] = None,
    ignore_index: Optional[int] = DEFAULT_IGNORE_INDEX,
):
    """MiLe: ce [s, b] (with gradient) and w = (sigma + H)^gamma [s, b] (detached), vocab-parallel.

    H is the entropy of the model's predicted distribution over the real vocabulary. Collectives: see
    vocab_parallel_weighted_cross_entropy (MAX [N], then one SUM [3, N]; none in backward).
    """
    spec = LossSpec("mile", gamma, sigma, entropy_threshold)
    out = vocab_parallel_weighted_cross_entropy(logits, target, spec, vocab_size, ignore_index, tp_group)
    return out.loss, out.weight


def vocab_parallel_focal(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group=None,
    ignore_index: Optional[int] = DEFAULT_IGNORE_INDEX,
):
    """Focal loss pieces: ce [s, b] (with gradient) and w = (1 - p_target)^gamma [s, b] (detached).

    Collectives: MAX [N], then one SUM [2, N]; none in backward.
    """
    spec = LossSpec("focal", gamma)
    out = vocab_parallel_weighted_cross_entropy(logits, target, spec, vocab_size, ignore_index, tp_group)
    return out.loss, out.weight


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """megatron-core's `tensor_parallel.vocab_parallel_cross_entropy`, same signature and return: a drop-in.

    Args:
        vocab_parallel_logits: [s, b, V/tp] this rank's shard of the logits (every column is vocabulary, as
            in megatron-core: no padding is excluded), fp32 or bf16.
        target: [s, b] token ids in [0, tp * V/tp).
        label_smoothing: alpha in [0, 1), as megatron-core: 1 - alpha on the target, alpha spread over the
            other V - 1 tokens; loss = (1 - s) ce - s mean_v log p_v with s = alpha V / (V - 1).

    Returns:
        the per-token loss [s, b] fp32, with gradient to the logits.

    Differences from megatron-core, each deliberate: fp32 logits are overwritten in place as megatron-core
    does, but with exp(z - max) (megatron-core leaves the softmax); bf16 logits are left untouched (megatron-
    core works on an fp32 copy too). With label smoothing at TP > 1, mean_v log p_v is taken over the whole
    vocabulary (one more row in the packed SUM), where megatron-core averages over each rank's shard, so its
    ranks see different losses; here every TP size gives megatron-core's TP 1 value. Out-of-range targets
    raise ValueError (megatron-core silently scores them as logit 0).

    Collectives on megatron's tensor-parallel group: all-reduce MAX [N], one all-reduce SUM [k, N]
    (k = 2, 3 with label smoothing); none in backward (megatron-core issues three forward).
    """
    spec = CROSS_ENTROPY if not label_smoothing else LossSpec("cross_entropy", label_smoothing=label_smoothing)
    return vocab_parallel_weighted_cross_entropy(
        vocab_parallel_logits, target, spec, ignore_index=None, reuse_logits_for_grad=True
    ).loss
