"""Fused output layer + MiLe / focal / cross-entropy loss that never materialises the [s, b, V/tp] logits.

The unfused path computes logits = hidden @ W^T ([s, b, V/tp], the largest activation of a GPT model: 2 GiB
in fp32 for 16k tokens at vocab 32000), keeps them for backward and allocates their gradient. Here the
output projection and the loss run together over chunks of tokens, and the gradient of each chunk with
respect to `hidden` and `W` is produced in the same pass, while its logits are still in a scratch buffer.

Why the gradient can be computed in forward: every loss of this project backpropagates

    sum_t mask_t * w_t * ce_t        (w_t detached; megatron_mile.loss.reduction)

so the gradient of the token's logits is  g * mask_t * w_t * (softmax(z_t) - onehot(y_t)),  where the
scalar g (the upstream gradient, e.g. 1 / sum(w) times the loss scale) is the same for every token and
arrives only in backward. Forward therefore computes, per chunk of c tokens,

    z        = hidden_c @ W_owned^T                         [c, V_owned]   (this rank's real columns)
    m        = max_v z                 -> all-reduce MAX    [c]
    S, T, zt = sum e, sum e (z - m), z_target - m, e = exp(z - m)
                                       -> all-reduce SUM    [k, c]  (k = 3 with the entropy, else 2)
    ce, H, w from S, T, zt              (exactly as megatron_mile.loss.vocab_parallel)
    G        = mask * w * (e / S - onehot)                  [c, V_owned]   (in the same scratch buffer)
    grad_hidden[c rows] = G @ W_owned                       [c, h]
    grad_W[owned rows] += G^T @ hidden_c                    [V_owned, h]

and backward only multiplies the stored grad_hidden / grad_W by g (and sums grad_hidden over the
tensor-parallel ranks). Vocabulary padding (columns at or beyond the real vocab_size) is never multiplied:
it takes no part in the max, the sums or the gradient, and its rows of grad_W are zero.

Collectives on the tensor-parallel group (none when it has one rank):
    forward:  per chunk, an all-reduce MAX of [c] fp32 and ONE all-reduce SUM of [k, c] fp32, i.e.
              2 * ceil(tokens / chunk_tokens) all-reduces per call (the unfused loss issues 2 in total;
              the extra ones carry the same bytes, only in smaller messages);
    backward: one all-reduce SUM of grad_hidden [s, b, h] fp32, when reduce_grad_hidden (the default).
It replaces the all-reduce megatron's ColumnParallelLinear issues for the gradient of its replicated
input (copy_to_tensor_model_parallel_region), so the caller must NOT also route `hidden` through that
region (or must pass reduce_grad_hidden=False if it does, e.g. after a sequence-parallel all-gather whose
backward reduce-scatters).

Memory beyond the inputs: two fp32 scratch blocks of [chunk_tokens, V/tp]; for bf16 inputs also a bf16
staging block of [~GRAD_GROUP_TOKENS, V/tp] (one chunk when no gradient is needed) and a bf16 [V/tp, h];
the fp32 accumulators grad_hidden [s, b, h] and grad_W [V/tp, h] (only when gradients are needed, scaled
in place in backward); per-token vectors. chunk_tokens defaults to what fits DEFAULT_CHUNK_BYTES per fp32
block.

Precision: the matmuls run in the input dtype, as megatron's output layer does (bf16 inputs give bf16 logits
that are upcast to fp32 for the loss, and a bf16-rounded logit gradient for the two gradient matmuls);
everything per token is fp32; grad_W is accumulated over chunks in fp32 and rounded to the weight's dtype
once, in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mile.loss.reduction import MicroBatchLoss, reduce_micro_batch
from megatron_mile.loss.vocab_parallel import (
    DEFAULT_IGNORE_INDEX,
    _group_rank_and_size,
    _tp_group_or_default,
    validate_loss_arguments,
)

# Bytes of one fp32 [chunk_tokens, V/tp] scratch block. 32 MiB keeps the scratch small next to the model
# (two blocks = 64 MiB) while each matmul chunk stays large enough to run at full speed: at V/tp = 32000
# it is 262 tokens, [262, h] @ [h, 32000].
DEFAULT_CHUNK_BYTES = 32 << 20

# bf16 inputs: tokens whose bf16 logit gradients are staged before the two gradient matmuls run on all of
# them at once (see _FusedLMHeadLoss.forward), rounded up to whole chunks. Each group costs one fp32 pass
# over grad_W [V/tp, h] against a matmul of group_tokens * V/tp * h, so the pass's share is ~1/group_tokens
# whatever V/tp is: ~1024 tokens keeps it small (at h = 512) with a staging buffer of 2 * 1024 * V/tp bytes.
GRAD_GROUP_TOKENS = 1024


def grad_group_chunks(chunk_tokens: int) -> int:
    """Chunks per bf16 gradient group: GRAD_GROUP_TOKENS rounded up to whole chunks (at least 1)."""
    return max(1, -(-GRAD_GROUP_TOKENS // max(int(chunk_tokens), 1)))


def chunk_tokens_for_budget(partition: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one fp32 [chunk, partition] block takes at most `chunk_bytes` (at least 1).

    `partition` is the PADDED shard width V_padded / tp, equal on every tensor-parallel rank, so every rank
    derives the same chunk count and issues the same number of collectives.
    """
    return max(1, int(chunk_bytes) // (4 * max(int(partition), 1)))


@dataclass
class FusedLMHeadOutput:
    """What one call of fused_lm_head_loss returns.

    weighted_ce_sum: sum_t(mask_t * w_t * ce_t), fp32 scalar WITH gradient to hidden and weight.
    ce, weight, entropy: per token [s, b] fp32, detached, NOT multiplied by the loss mask (as
        vocab_parallel_weighted_cross_entropy returns them; ignore_index positions are 0). entropy is an
        empty tensor unless it was needed (MiLe) or asked for (return_entropy).
    """

    weighted_ce_sum: torch.Tensor
    ce: torch.Tensor
    weight: torch.Tensor
    entropy: torch.Tensor


def _token_weights(loss_type, ce, entropy, gamma, sigma, entropy_threshold, vocab_size):
    """Detached per-token weight [c] from ce / entropy [c]; the formulas of vocab_parallel, in one place."""
    if loss_type == "mile":
        weight = (sigma + entropy).pow(gamma)
        if entropy_threshold is not None:
            below = entropy / math.log(vocab_size) < entropy_threshold
            weight = torch.where(below, torch.ones_like(weight), weight)
        return weight
    if loss_type == "focal":
        # 1 - p_target = -expm1(-ce): exact for confident tokens where p_target is close to 1.
        return torch.neg(torch.expm1(-ce)).clamp_(min=0.0).pow_(gamma)
    return torch.ones_like(ce)


class _FusedLMHeadLoss(torch.autograd.Function):
    """sum(mask * w * ce) of hidden @ W^T, with grad_hidden / grad_W computed in forward (module docstring).

    Forward collectives (tp_group): per chunk, all-reduce MAX [c] then all-reduce SUM [k, c].
    Backward collectives: all-reduce SUM of grad_hidden [N, h] fp32 when reduce_grad_hidden and TP > 1.
    Saved for backward: the fp32 grad_hidden [N, h] and grad_W [V/tp, h] accumulators only, scaled in place
    by the one backward they allow.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [s, b, h], replicated over the TP group
        weight: torch.Tensor,  # [v/tp, h], this rank's shard of the output layer
        target: torch.Tensor,  # [s, b]
        loss_mask: torch.Tensor,  # [s, b] fp32 (1 = counts)
        loss_type: str,
        gamma: float,
        sigma: float,
        vocab_size: int,
        entropy_threshold: Optional[float],
        ignore_index: Optional[int],
        tp_group,
        chunk_tokens: int,
        want_entropy: bool,
        grad_hidden_needed: bool,
        grad_weight_needed: bool,
        reduce_grad_hidden: bool,
    ):
        rank, tp_size = _group_rank_and_size(tp_group)
        partition, hidden_size = weight.shape
        vocab_start = rank * partition
        # Real-vocabulary columns of this shard; padded rows of W are never multiplied.
        owned = max(0, min(partition, vocab_size - vocab_start))
        device = hidden.device
        compute_dtype = hidden.dtype
        need_entropy = loss_type == "mile" or want_entropy
        need_grad = grad_hidden_needed or grad_weight_needed

        hidden_2d = hidden.reshape(-1, hidden_size)  # [N, h]
        target_1d = target.reshape(-1)  # [N]
        num_tokens = hidden_2d.size(0)
        weight_owned = weight[:owned]  # [v_owned, h], a view
        if grad_weight_needed:
            # fp32 accumulator over chunks; padded rows stay zero.
            grad_weight_acc = torch.zeros((partition, hidden_size), dtype=torch.float32, device=device)
        else:
            grad_weight_acc = None
        grad_hidden_acc = (
            torch.empty((num_tokens, hidden_size), dtype=torch.float32, device=device)
            if grad_hidden_needed
            else None
        )

        ignored = target_1d == ignore_index if ignore_index is not None else None
        mask_1d = loss_mask.reshape(-1)
        if ignored is not None:
            mask_1d = mask_1d.masked_fill(ignored, 0.0)
        local_target = target_1d - vocab_start
        target_here = (local_target >= 0) & (local_target < owned)
        if ignored is not None:
            target_here &= ~ignored
        local_target = torch.where(target_here, local_target, torch.zeros_like(local_target))

        ce = torch.empty(num_tokens, dtype=torch.float32, device=device)  # [N]
        token_weight = torch.empty_like(ce)  # [N]
        entropy = torch.empty_like(ce) if need_entropy else None  # [N]

        rows = max(1, min(chunk_tokens, num_tokens))
        cols = max(owned, 1)
        # Scratch reused by every chunk: z (shifted logits, later e * z) and e (exp, later the gradient).
        z_buf = torch.empty((rows, cols), dtype=torch.float32, device=device)  # [c, v_owned]
        e_buf = torch.empty_like(z_buf)  # [c, v_owned]
        low_precision = compute_dtype != torch.float32
        # bf16: the matmuls run in the input dtype (bf16 tensor cores / AVX512-BF16). Their [rows, v] operands
        # live in `stage`: first the chunk's bf16 logits, then its bf16-rounded logit gradient. The gradient
        # matmuls run once per grad_group_chunks(rows) chunks on the staged rows, because each grad_W product
        # [v_owned, h] must be added to the fp32 accumulator, a pass over all of grad_W whose cost does not
        # shrink with the chunk; grouping cuts the number of those passes.
        group = grad_group_chunks(rows) if (low_precision and need_grad and owned > 0) else 1
        if low_precision:
            stage = torch.empty((group * rows, cols), dtype=compute_dtype, device=device)  # [g*c, v_owned]
            gw_buf = (
                torch.empty((cols, hidden_size), dtype=compute_dtype, device=device)
                if grad_weight_acc is not None
                else None
            )
        if need_grad and owned == 0 and grad_hidden_needed:
            # No real column on this rank: its logits depend neither on hidden nor on W.
            grad_hidden_acc.zero_()
        row_index = torch.arange(rows, device=device)
        staged_from = 0  # first token whose bf16 gradient sits in `stage`

        for chunk_index, start in enumerate(range(0, num_tokens, rows)):
            end = min(start + rows, num_tokens)
            n = end - start
            hidden_c = hidden_2d[start:end]  # [c, h]
            z = z_buf[:n]
            e = e_buf[:n]
            tgt = local_target[start:end]
            here = target_here[start:end]
            if low_precision:
                slot = (chunk_index % group) * rows
                staged = stage[slot : slot + n]  # [c, v_owned] in the input dtype

            # --- logits of this chunk and collective 1: MAX ---
            if owned > 0:
                if low_precision:
                    torch.mm(hidden_c, weight_owned.t(), out=staged)
                    z.copy_(staged)
                else:
                    torch.mm(hidden_c, weight_owned.t(), out=z)
                chunk_max = z.amax(dim=-1)  # [c]
            else:
                chunk_max = torch.full((n,), float("-inf"), device=device)
            if tp_size > 1:
                dist.all_reduce(chunk_max, op=dist.ReduceOp.MAX, group=tp_group)

            # --- packed sums and collective 2: SUM ---
            stats = torch.zeros((3 if need_entropy else 2, n), dtype=torch.float32, device=device)  # [k, c]
            if owned > 0:
                z.sub_(chunk_max[:, None])
                torch.exp(z, out=e)
                torch.sum(e, dim=-1, out=stats[1])
                picked = z.gather(1, tgt[:, None]).squeeze(1)
                stats[0] = torch.where(here, picked, torch.zeros_like(picked))
                if need_entropy:
                    z.mul_(e)  # e * (z - m); z is not needed any more
                    torch.sum(z, dim=-1, out=stats[2])
            if tp_size > 1:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)

            log_sum_exp = torch.log(stats[1])  # [c], shifted by the max
            ce_c = log_sum_exp - stats[0]
            entropy_c = (log_sum_exp - stats[2] / stats[1]).clamp_(min=0.0) if need_entropy else None
            weight_c = _token_weights(loss_type, ce_c, entropy_c, gamma, sigma, entropy_threshold, vocab_size)
            ce[start:end] = ce_c
            token_weight[start:end] = weight_c
            if need_entropy:
                entropy[start:end] = entropy_c

            if not need_grad or owned == 0:
                continue
            # --- this chunk's logit gradient, in e's storage: mask * w * (softmax - onehot) ---
            scale = mask_1d[start:end] * weight_c  # [c]
            e.mul_((scale / stats[1])[:, None])
            e[row_index[:n], tgt] -= scale * here.float()
            if not low_precision:
                if grad_hidden_needed:
                    torch.mm(e, weight_owned, out=grad_hidden_acc[start:end])
                if grad_weight_acc is not None:
                    grad_weight_acc[:owned].addmm_(e.t(), hidden_c)  # accumulates in place, in fp32
                continue
            # Round the logit gradient to the input dtype once, as the unfused path's autograd does.
            staged.copy_(e)
            if chunk_index % group == group - 1 or end == num_tokens:
                grad_logits = stage[: end - staged_from]  # [g*c, v_owned]
                if grad_hidden_needed:
                    grad_hidden_acc[staged_from:end].copy_(torch.mm(grad_logits, weight_owned))
                if grad_weight_acc is not None:
                    torch.mm(grad_logits.t(), hidden_2d[staged_from:end], out=gw_buf)
                    grad_weight_acc[:owned].add_(gw_buf)
                staged_from = end

        del z_buf, e_buf
        if ignored is not None:
            keep = (~ignored).float()
            ce.mul_(keep)
            token_weight.mul_(keep)
            if entropy is not None:
                entropy.mul_(keep)
        # The same arithmetic as reduction.reduce_micro_batch: (w * mask) * ce, summed.
        weighted_ce_sum = ((token_weight * mask_1d) * ce).sum()

        ctx.grad_hidden = grad_hidden_acc
        ctx.grad_weight = grad_weight_acc
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        ctx.weight_dtype = weight.dtype
        ctx.tp_group = tp_group if tp_size > 1 and reduce_grad_hidden else None

        shape = target.shape
        entropy_out = entropy.view(shape) if entropy is not None else torch.empty(0, device=device)
        outputs = (weighted_ce_sum, ce.view(shape), token_weight.view(shape), entropy_out)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_sum, _grad_ce, _grad_weight, _grad_entropy):
        """Scale the gradients computed in forward by the incoming scalar; all-reduce grad_hidden over TP.

        Collective: all-reduce SUM of [N, h] fp32 on the TP group (skipped at TP 1 or with
        reduce_grad_hidden=False). It sums, for the replicated `hidden`, the contributions of every
        vocabulary shard, after each rank applied its own upstream scalar.
        """
        if ctx.grad_hidden is None and ctx.grad_weight is None:
            raise RuntimeError(
                "fused_lm_head_loss: its gradients were computed in forward and are consumed by the first "
                "backward; call it again for another backward (retain_graph cannot replay it)"
            )
        scale = grad_sum.float()
        grad_hidden = grad_weight = None
        # Scaled in place: the accumulators are dropped from ctx below, so a second backward (retain_graph)
        # raises instead of seeing them scaled twice. For fp32 inputs `.to` is then a no-op, so backward
        # allocates nothing; for bf16 only the rounded copies.
        if ctx.grad_hidden is not None:
            shape, dtype = ctx.hidden_meta
            grad_hidden = ctx.grad_hidden.mul_(scale)  # [N, h] fp32
            if ctx.tp_group is not None:
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
            grad_hidden = grad_hidden.to(dtype).view(shape)
        if ctx.grad_weight is not None:
            grad_weight = ctx.grad_weight.mul_(scale).to(ctx.weight_dtype)  # [v/tp, h]
        ctx.grad_hidden = ctx.grad_weight = None
        return (grad_hidden, grad_weight) + (None,) * 14


def _validate(hidden, weight, target, loss_mask, vocab_size, padded_vocab_size, ignore_index, chunk_tokens):
    if not hidden.is_floating_point() or hidden.dim() < 2:
        raise ValueError(f"hidden must be a floating-point [s, b, h] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(
            f"weight must be this rank's output-layer shard [V/tp, h] with h = hidden.size(-1) = "
            f"{hidden.size(-1)}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal hidden shape without its last dimension "
            f"{tuple(hidden.shape[:-1])} (hidden [s, b, h], target [s, b])"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(target.shape):
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal target shape {tuple(target.shape)}")
    if not (0 < vocab_size <= padded_vocab_size):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {padded_vocab_size}] = tp_size * weight.size(0); pass the "
            "real (unpadded) vocabulary size, or check that tp_group is the group that split the weight"
        )
    if chunk_tokens is not None and int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (or None for the memory budget), got {chunk_tokens!r}")
    if target.numel() == 0:
        return
    valid = target if ignore_index is None else target[target != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        bad = valid[(valid < 0) | (valid >= vocab_size)][0].item()
        raise ValueError(
            f"target contains id {bad}, outside the vocabulary [0, {vocab_size}); check the tokenizer and "
            f"--vocab-size (ignored positions may use ignore_index={ignore_index})"
        )


def fused_lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    loss_type: str = "cross_entropy",
    gamma: float = 1.0,
    sigma: float = 1.0,
    vocab_size: Optional[int] = None,
    entropy_threshold: Optional[float] = None,
    ignore_index: Optional[int] = DEFAULT_IGNORE_INDEX,
    tp_group=None,
    chunk_tokens: Optional[int] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    return_entropy: bool = False,
    reduce_grad_hidden: bool = True,
) -> FusedLMHeadOutput:
    """Output projection + weighted loss in chunks: sum(mask * w * ce) of logits = hidden @ weight^T.

    Equal (to rounding) to `vocab_parallel_weighted_cross_entropy(hidden @ weight.T, ...)` followed by
    `sum(loss_mask * w * ce)`, but the [s, b, V/tp] logits are never held: see the module docstring.

    Args:
        hidden: [s, b, h] final hidden states (after the final norm), the FULL sequence, replicated over
            the TP group (with sequence parallelism: all-gathered first, see reduce_grad_hidden).
        weight: [V_padded/tp, h] this rank's shard of the output layer (output_layer.weight, or the
            word-embedding weight when embeddings are tied), same dtype as hidden.
        target: [s, b] global token ids in [0, vocab_size), or ignore_index.
        loss_mask: [s, b], 1 where the token counts (None: all count). It must be known in forward,
            because the gradient is computed there.
        loss_type, gamma, sigma, entropy_threshold: as in vocab_parallel_weighted_cross_entropy.
        vocab_size: the real vocabulary; rows of `weight` at or beyond it (padding) take no part.
        tp_group: tensor-parallel group over which the vocabulary is split (default: megatron's).
        chunk_tokens: tokens per chunk; must be the same on every TP rank. Default: the largest count whose
            fp32 [chunk, V/tp] block fits in `chunk_bytes` (chunk_tokens_for_budget).
        return_entropy: compute H for logging even for cross-entropy / focal (MiLe always has it).
        reduce_grad_hidden: all-reduce grad_hidden over tp_group in backward (default). Pass False when the
            caller's own autograd already sums it over TP (hidden from copy_to_tensor_model_parallel_region
            or from a sequence-parallel all-gather, whose backward reduce-scatters).

    Gradients are computed only when autograd is enabled and hidden or weight requires grad; otherwise
    (evaluation, torch.no_grad) the call costs one matmul plus the loss, and allocates no gradient buffer.

    Collectives on tp_group: forward, per chunk, an all-reduce MAX of [c] fp32 then one all-reduce SUM of
    [k, c] fp32 (k = 3 with the entropy, else 2): 2 * ceil(s * b / chunk_tokens) in all. Backward: one
    all-reduce SUM of [s, b, h] fp32 (when reduce_grad_hidden and TP > 1).
    """
    validate_loss_arguments(loss_type, gamma, sigma, entropy_threshold)
    tp_group = _tp_group_or_default(tp_group)
    _, tp_size = _group_rank_and_size(tp_group)
    padded_vocab_size = weight.size(0) * tp_size if weight.dim() == 2 else 0
    vocab_size = padded_vocab_size if vocab_size is None else int(vocab_size)
    _validate(hidden, weight, target, loss_mask, vocab_size, padded_vocab_size, ignore_index, chunk_tokens)
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for_budget(weight.size(0), chunk_bytes)
    mask = (
        torch.ones(target.shape, dtype=torch.float32, device=hidden.device)
        if loss_mask is None
        else loss_mask.to(device=hidden.device, dtype=torch.float32)
    )
    grad_enabled = torch.is_grad_enabled()
    grad_hidden_needed = grad_enabled and hidden.requires_grad
    grad_weight_needed = grad_enabled and weight.requires_grad
    weighted_ce_sum, ce, token_weight, entropy = _FusedLMHeadLoss.apply(
        hidden,
        weight,
        target,
        mask,
        loss_type,
        float(gamma),
        float(sigma),
        vocab_size,
        entropy_threshold,
        ignore_index,
        tp_group,
        int(chunk_tokens),
        return_entropy,
        grad_hidden_needed,
        grad_weight_needed,
        reduce_grad_hidden,
    )
    return FusedLMHeadOutput(weighted_ce_sum, ce, token_weight, entropy)


def fused_lm_head_micro_batch_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> MicroBatchLoss:
    """fused_lm_head_loss reduced to the MicroBatchLoss the training step collects.

    Same arguments as fused_lm_head_loss (keywords after loss_mask). weighted_ce_sum carries the
    gradient to hidden and weight; sums, weight_min and weight_max are those reduce_micro_batch would
    give for the unfused path's per-token ce / weight / entropy and the same loss_mask. The entropy sum
    is 0 unless the loss is MiLe or return_entropy=True. Collectives: those of fused_lm_head_loss.
    """
    out = fused_lm_head_loss(hidden, weight, target, loss_mask, **kwargs)
    entropy = out.entropy if out.entropy.numel() else None
    # Detached statistics from the detached per-token values; the differentiable sum is the fused one.
    part = reduce_micro_batch(out.ce, out.weight, loss_mask, entropy)
    return MicroBatchLoss(out.weighted_ce_sum, part.sums, part.weight_min, part.weight_max)
