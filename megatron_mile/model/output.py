"""The per-token output contract between the model's loss hook and the training step's loss function.

With labels, MileGPTModel returns, per token, the training loss l (carrying the gradient: the cross-entropy,
label-smoothed and with the z-loss when the LossSpec has them), the plain cross-entropy, its detached loss
weight, the detached entropy and the z-loss, packed as one [b, s, 5] tensor: megatron's pipeline schedules
pass a single tensor from the model to the loss function (megatron_mile.training.step.LossCollector), which
forms sum(mask * w * l) from it and logs the plain cross-entropy as `lm loss`. Both output paths (the
unfused output layer, and the fused linear cross-entropy of megatron_mile.model.fused_output_layer) build it
with `pack_token_losses`.
"""

from __future__ import annotations

import torch

from megatron_mile.loss import TokenLosses

# Index of each per-token quantity along the last dimension of the packed [b, s, 5] output.
LOSS, CE, WEIGHT, ENTROPY, Z_LOSS = range(5)


def pack_token_losses(losses: TokenLosses) -> torch.Tensor:
    """[s, b] per-token values -> the packed [b, s, 5] output (the loss column keeps its gradient).

    An empty entropy or z-loss (not computed) becomes a column of zeros.
    """
    loss = losses.loss
    columns = [loss, losses.ce, losses.weight, losses.entropy, losses.z_loss]
    columns = [c if c.numel() else torch.zeros_like(loss) for c in columns]
    packed = torch.stack(columns, dim=-1)  # [s, b, 5]
    return packed.transpose(0, 1).contiguous()  # [b, s, 5]
