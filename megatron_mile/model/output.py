"""The per-token output contract between the model's loss hook and the training step's loss function.

With labels, MileGPTModel returns, per token, the cross-entropy (carrying the gradient), its detached loss
weight and the detached entropy, packed as one [b, s, 3] tensor: megatron's pipeline schedules pass a
single tensor from the model to the loss function (megatron_mile.training.step.LossCollector), which forms
sum(mask * w * ce) from it. Both output paths (the unfused output layer, and the fused linear
cross-entropy of megatron_mile.model.fused_output_layer) build it with `pack_token_losses`.
"""

from __future__ import annotations

import torch

# Index of each per-token quantity along the last dimension of the packed [b, s, 3] output.
CE, WEIGHT, ENTROPY = 0, 1, 2


def pack_token_losses(ce: torch.Tensor, weight: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """[s, b] ce, weight and entropy -> the packed [b, s, 3] output (ce keeps its gradient).

    entropy may be an empty tensor (not computed this step): its column is then zeros.
    """
    if entropy.numel() == 0:
        entropy = torch.zeros_like(ce)
    packed = torch.stack([ce, weight, entropy], dim=-1)  # [s, b, 3]
    return packed.transpose(0, 1).contiguous()  # [b, s, 3]
