"""Fused linear cross-entropy: output layer + weighted loss without the [s, b, V/tp] logits (--fused-lm-head).

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
    ce, H, w from S, T, zt              (the per-shard steps of megatron_mile.loss.shard, as the unfused path)
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

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mile.loss import shard as shard_steps
from megatron_mile.loss.shard import DEFAULT_IGNORE_INDEX, TokenLosses, VocabShard
from megatron_mile.loss.spec import CROSS_ENTROPY, LossSpec

# Bytes of one fp32 [chunk_tokens, V/tp] scratch block. 32 MiB keeps the scratch small next to the model
# (two blocks = 64 MiB) while each matmul chunk stays large enough to run at full speed: at V/tp = 32000
# it is 262 tokens, [262, h] @ [h, 32000].
DEFAULT_CHUNK_BYTES = 32 << 20

# bf16 inputs: tokens whose bf16 logit gradients are staged before the two gradient matmuls run on all of
# them at once (see _FusedLinearCrossEntropy.forward), rounded up to whole chunks. Each group costs one fp32 pass
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
class FusedLinearCrossEntropyOutput:
    """What one call of fused_linear_cross_entropy returns.

    weighted_loss_sum: sum_t(mask_t * w_t * l_t) of the per-token loss l (cross-entropy, with label
        smoothing and z-loss when the spec has them), fp32 scalar WITH gradient to hidden and weight.
    losses: the per-token TokenLosses [s, b] fp32, all detached here (the gradient is the scalar's), NOT
        multiplied by the loss mask (as megatron_mile.loss.vocab_parallel_weighted_cross_entropy returns
        them; ignore_index positions are 0). Its entropy is an empty tensor unless the weighting needs it or
        it was asked for (return_entropy).
    """

    weighted_loss_sum: torch.Tensor
    losses: TokenLosses

    def __getattr__(self, name: str):
        """The per-token fields of `losses` (loss, ce, weight, entropy, z_loss) read directly, for brevity."""
        if name == "losses":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.losses, name)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum(mask * w * l) of hidden @ W^T, with grad_hidden / grad_W computed in forward (module docstring).

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
        spec: LossSpec,
        shard: VocabShard,
        ignore_index: Optional[int],
        chunk_tokens: int,
        want_entropy: bool,
        grad_hidden_needed: bool,
        grad_weight_needed: bool,
        reduce_grad_hidden: bool,
    ):
        partition, hidden_size = weight.shape
        # Real-vocabulary columns of this shard; padded rows of W are never multiplied.
        owned = shard.owned
        device = hidden.device
        compute_dtype = hidden.dtype
        layout = shard_steps.StatisticsLayout.of(spec, want_entropy)
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

        targets = shard_steps.targets_on_shard(target_1d, shard, ignore_index)
        local_target, target_here, ignored = targets
        mask_1d = loss_mask.reshape(-1)
        if ignored is not None:
            mask_1d = mask_1d.masked_fill(ignored, 0.0)

        loss = torch.empty(num_tokens, dtype=torch.float32, device=device)  # [N]
        ce = torch.empty_like(loss)  # [N]
        token_weight = torch.empty_like(loss)  # [N]
        entropy = torch.empty_like(loss) if layout.entropy else None  # [N]
        z_loss = torch.empty_like(loss) if spec.z_loss_coeff > 0 else None  # [N]

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
        staged_from = 0  # first token whose bf16 gradient sits in `stage`

        for chunk_index, start in enumerate(range(0, num_tokens, rows)):
            end = min(start + rows, num_tokens)
            n = end - start
            hidden_c = hidden_2d[start:end]  # [c, h]
            z = z_buf[:n]
            e = e_buf[:n]
            tgt = local_target[start:end]
            here = target_here[start:end]
            targets_c = shard_steps.ShardTargets(tgt, here, None)
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
            shard_steps.all_reduce_max(chunk_max, shard)

            # --- packed sums and collective 2: SUM ---
            stats = shard_steps.new_statistics(n, layout, device)  # [k, c]
            if owned > 0:
                z.sub_(chunk_max[:, None])
                picked = z.gather(1, tgt[:, None]).squeeze(1)
                shard_steps.put_target_logit(stats, picked, targets_c)
                shard_steps.exp_sums_(z, e, stats, layout)
            shard_steps.all_reduce_statistics(stats, shard)
            out = shard_steps.token_losses(stats, spec, shard, chunk_max, layout)
            loss[start:end] = out.loss
            ce[start:end] = out.ce
            token_weight[start:end] = out.weight
            if layout.entropy:
                entropy[start:end] = out.entropy
            if z_loss is not None:
                z_loss[start:end] = out.z_loss

            if not need_grad or owned == 0:
                continue
            # --- this chunk's logit gradient, in e's storage: mask * w * (dl / dz) (megatron_mile.loss.shard) ---
            scale = mask_1d[start:end] * out.weight  # [c]
            target_scale, uniform_scale = shard_steps.target_and_uniform_scales(spec, shard.vocab_size, scale, here)
            prob_scale = scale if out.prob_scale is None else scale * out.prob_scale
            shard_steps.softmax_grad_(e, prob_scale / stats[shard_steps.SUM_EXP], target_scale, tgt, uniform_scale)
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
        shard_steps.zero_ignored_(ignored, loss, ce, token_weight, entropy, z_loss)
        # The same arithmetic as reduction.reduce_micro_batch: (w * mask) * l, summed.
        weighted_loss_sum = ((token_weight * mask_1d) * loss).sum()

        ctx.grad_hidden = grad_hidden_acc
        ctx.grad_weight = grad_weight_acc
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        ctx.weight_dtype = weight.dtype
        ctx.tp_group = shard.tp_group if shard.tp_size > 1 and reduce_grad_hidden else None

        shape = target.shape
        empty = torch.empty(0, device=device)
        outputs = (weighted_loss_sum, loss.view(shape), token_weight.view(shape),
                   entropy.view(shape) if entropy is not None else empty, ce.view(shape),
                   z_loss.view(shape) if z_loss is not None else empty)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_sum, *_grad_per_token):
        """Scale the gradients computed in forward by the incoming scalar; all-reduce grad_hidden over TP.

        Collective: all-reduce SUM of [N, h] fp32 on the TP group (skipped at TP 1 or with
        reduce_grad_hidden=False). It sums, for the replicated `hidden`, the contributions of every
        vocabulary shard, after each rank applied its own upstream scalar.
        """
        if ctx.grad_hidden is None and ctx.grad_weight is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: its gradients were computed in forward and are consumed by the first "
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
        return (grad_hidden, grad_weight) + (None,) * 10


def _validate_operands(hidden, weight) -> None:
    if not hidden.is_floating_point() or hidden.dim() < 2:
        raise ValueError(f"hidden must be a floating-point [s, b, h] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(
            f"weight must be this rank's output-layer shard [V/tp, h] with h = hidden.size(-1) = "
            f"{hidden.size(-1)}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")


def _validate_options(hidden, loss_mask, chunk_tokens) -> None:
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal target shape {tuple(hidden.shape[:-1])}")
    if chunk_tokens is not None and int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (or None for the memory budget), got {chunk_tokens!r}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    spec: LossSpec = CROSS_ENTROPY,
    vocab_size: Optional[int] = None,
    ignore_index: Optional[int] = DEFAULT_IGNORE_INDEX,
    tp_group=None,
    chunk_tokens: Optional[int] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    return_entropy: bool = False,
    reduce_grad_hidden: bool = True,
) -> FusedLinearCrossEntropyOutput:
    """Output projection + weighted loss in chunks: sum(mask * w * l) of logits = hidden @ weight^T.

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
        spec: the loss (megatron_mile.loss.spec.LossSpec), as in vocab_parallel_weighted_cross_entropy, except
            the weightings that select among the micro-batch's tokens (spec.needs_token_scope): ValueError.
        vocab_size: the real vocabulary; rows of `weight` at or beyond it (padding) take no part.
        tp_group: tensor-parallel group over which the vocabulary is split (default: megatron's).
        chunk_tokens: tokens per chunk; must be the same on every TP rank. Default: the largest count whose
            fp32 [chunk, V/tp] block fits in `chunk_bytes` (chunk_tokens_for_budget).
        return_entropy: compute H for logging even when the weighting does not need it (MiLe has it).
        reduce_grad_hidden: all-reduce grad_hidden over tp_group in backward (default). Pass False when the
            caller's own autograd already sums it over TP (hidden from copy_to_tensor_model_parallel_region
            or from a sequence-parallel all-gather, whose backward reduce-scatters).

    Gradients are computed only when autograd is enabled and hidden or weight requires grad; otherwise
    (evaluation, torch.no_grad) the call costs one matmul plus the loss, and allocates no gradient buffer.

    Collectives on tp_group: forward, per chunk, an all-reduce MAX of [c] fp32 then one all-reduce SUM of
    [k, c] fp32 (k = 3 with the entropy, else 2): 2 * ceil(s * b / chunk_tokens) in all. Backward: one
    all-reduce SUM of [s, b, h] fp32 (when reduce_grad_hidden and TP > 1).
    """
    _validate_operands(hidden, weight)
    if spec.needs_token_scope:
        raise ValueError(f"the fused linear cross-entropy cannot train {spec.loss_type}: it forms each chunk's "
                         "gradient before the selection threshold over the whole micro-batch is known; use "
                         "vocab_parallel_weighted_cross_entropy on the logits")
    shard = VocabShard.of(weight.size(0), vocab_size, tp_group, what="weight.size(0)")
    shard_steps.validate_targets(target, hidden.shape[:-1], shard.vocab_size, ignore_index, "hidden [s, b, h]")
    _validate_options(hidden, loss_mask, chunk_tokens)
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
    weighted_loss_sum, *per_token = _FusedLinearCrossEntropy.apply(
        hidden,
        weight,
        target,
        mask,
        spec,
        shard,
        ignore_index,
        int(chunk_tokens),
        return_entropy,
        grad_hidden_needed,
        grad_weight_needed,
        reduce_grad_hidden,
    )
    return FusedLinearCrossEntropyOutput(weighted_loss_sum, TokenLosses(*per_token))
