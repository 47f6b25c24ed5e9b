"""The model's output layer + loss as one fused linear cross-entropy (--fused-lm-head).

Unfused, MileGPTModel computes logits = output_layer(hidden) [s, b, V/tp], and its loss hook packs the
per-token (loss, ce, weight, entropy, z-loss) as [b, s, 5] (megatron_mile.model.output); the training step's
loss function (LossCollector.loss_func) backpropagates sum(mask * w * l) through the loss column. Fused,
megatron_mile.loss.fused_linear_cross_entropy computes the same per-token values without holding the logits,
and the gradients of hidden and W already in forward, for the scalar sum(mask * w * l) it returns. So the
loss column cannot carry its own graph here: the packed tensor keeps its contract (same shape, same values,
gradient through the loss column) through a small autograd bridge that hands the gradient reaching the loss
column to that scalar, after checking that it is the gradient of sum(mask * w * l), the only one the fused
head can give.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_mile.loss.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_mile.model.output import pack_token_losses

# Largest relative deviation of the incoming loss gradient from g * mask * w that still counts as that
# gradient: fp32 rounding of g * w is ~1e-7; anything else is a caller weighting the tokens differently.
_BRIDGE_RTOL = 1e-4


class _LossGradientToFusedSum(torch.autograd.Function):
    """Per-token loss values [s, b] whose incoming gradient is routed into the fused head's sum(mask * w * l).

    The loss function computes sum(mask * w * l), so the gradient reaching l is g * mask * w for one
    scalar g; backward recovers g (least squares, in fp64) and passes it to weighted_loss_sum. Any other
    gradient (a loss function weighting the tokens differently) raises instead of training on a wrong
    gradient. No communication. Backward syncs with the device once (the check).
    """

    @staticmethod
    def forward(ctx, weighted_loss_sum, loss, token_scale):
        # weighted_loss_sum: fp32 scalar with the fused head's graph; loss, token_scale (= mask * w): [s, b]
        ctx.save_for_backward(token_scale)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        (token_scale,) = ctx.saved_tensors
        grad = grad_loss.double()  # [s, b]
        scale = token_scale.double()  # [s, b]
        norm = (scale * scale).sum()
        g = (grad * scale).sum() / norm if bool(norm > 0) else grad.new_zeros(())
        deviation = (grad - g * scale).abs().max() if grad.numel() else grad.new_zeros(())
        if bool(deviation > _BRIDGE_RTOL * grad.abs().max() + 1e-30):
            raise RuntimeError(
                "--fused-lm-head computes its gradients for the loss sum(loss_mask * w * l) in forward, but "
                "the gradient reaching the per-token loss is not proportional to loss_mask * w: the loss function weights "
                "the tokens differently (or got another loss_mask than the model). Use the unfused output "
                "layer for such a loss (drop --fused-lm-head)"
            )
        return g.float(), None, None


def fused_language_model_loss(model, hidden_states: torch.Tensor, labels: torch.Tensor,
                              loss_mask) -> torch.Tensor:
    """The packed [b, s, 5] per-token output of MileGPTModel.compute_language_model_loss, fused.

    hidden_states: [s, b, h] after the final norm ([s/tp, b, h] with sequence parallelism); labels and
    loss_mask: [b, s] (loss_mask None counts every token; the training step always passes it, because the
    gradient is computed in forward and must know which tokens count).

    Collectives on the TP group: those of fused_linear_cross_entropy (forward, per chunk of tokens, one all-reduce
    MAX and one SUM), and in backward either its all-reduce of grad_hidden, or, with sequence parallelism,
    the reduce-scatter of megatron's all-gather of the sequence shards (which sums the TP ranks'
    contributions itself, so the fused head must not).
    """
    tp_group = model.pg_collection.tp
    sequence_parallel = model.config.sequence_parallel
    hidden = hidden_states
    if sequence_parallel:
        # [s/tp, b, h] -> [s, b, h], as the output layer would gather it.
        hidden = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True, group=tp_group)
    # The tied word embedding (first stage, or the last stage's copy) or the output layer's own weight.
    weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
              else model.output_layer.weight)  # [V/tp, h]
    target = labels.transpose(0, 1).contiguous()  # [s, b]
    if loss_mask is None:
        mask = torch.ones(target.shape, dtype=torch.float32, device=target.device)
    else:
        mask = loss_mask.transpose(0, 1).to(torch.float32).contiguous()  # [s, b]
    out = fused_linear_cross_entropy(
        hidden,
        weight,
        target,
        mask,
        spec=model.loss_spec,
        vocab_size=model.real_vocab_size,
        ignore_index=None,  # megatron's datasets mask with loss_mask, never with an ignore id
        tp_group=tp_group,
        return_entropy=model.entropy_requested,
        reduce_grad_hidden=not sequence_parallel,
    )
    loss = _LossGradientToFusedSum.apply(out.weighted_loss_sum, out.loss, out.weight * mask)  # [s, b]
    return pack_token_losses(dataclasses.replace(out.losses, loss=loss))
