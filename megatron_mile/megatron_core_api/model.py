"""megatron-core's GPTModel with one seam for the language-model head and loss, on every supported release.

`GPTModelWithLossHook` is the base of the project's model (megatron_mile.model.gpt.MileGPTModel). A subclass
implements:

- megatron-core's own LM-loss hook, ``compute_language_model_loss(labels [b, s], logits [s, b, V/tp])``,
  called wherever megatron-core computes a language-model loss (the main head, and multi-token-prediction
  heads). `loss_mask_in_flight` holds the main head's loss mask [b, s] while it runs (None otherwise, and
  for multi-token-prediction heads, whose shifted mask megatron does not pass);
- optionally ``fused_output(hidden_states [s, b, h], labels, loss_mask) -> output or None``: the output layer
  and the loss together, replacing megatron's output layer for a training / evaluation forward with labels;
  None (the default) takes megatron's output layer and compute_language_model_loss.

How each release is reached:

- 0.18+ (0.19.x checked): ``GPTModel.forward(..., output_processor=...)``, the public hook that receives the
  final hidden states, the output layer and its weight, the labels and the loss mask. `forward` passes
  `_output_processor` whenever labels are given outside inference and the caller passed no processor of its
  own. Multi-token prediction runs before the processor, through ``compute_language_model_loss``.
- 0.16.1: no public hook: ``_postprocess`` (private, its parameters found by name) is overridden to hold the
  loss mask while megatron's own postprocessing runs and to take the fused path when the subclass asks.

Logits without labels, and inference, always take megatron's own path.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel

from megatron_mile.megatron_core_api import HAS_OUTPUT_PROCESSOR

__all__ = ["GPTModel", "GPTModelWithLossHook"]


class GPTModelWithLossHook(GPTModel):
    """GPTModel whose language-model loss (and optionally its fused output layer) is the subclass's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The micro-batch's loss mask [b, s] while the main head's loss runs (None otherwise): megatron
        # calls compute_language_model_loss(labels, logits) without the mask it was given.
        self.loss_mask_in_flight: Optional[torch.Tensor] = None

    def fused_output(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                     loss_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The output layer and the loss as one (a subclass's choice), or None for megatron's output layer."""
        return None

    if HAS_OUTPUT_PROCESSOR:

        def forward(self, *args, **kwargs):
            """GPTModel.forward with this model's output processor where a loss is asked for."""
            bound = _FORWARD_SIGNATURE.bind(self, *args, **kwargs).arguments
            if (bound.get("labels") is not None and bound.get("inference_context") is None
                    and bound.get("inference_params") is None and kwargs.get("output_processor") is None):
                kwargs["output_processor"] = self._output_processor
            return super().forward(*args, **kwargs)

        def _output_processor(self, *, hidden_states, output_layer, output_weight, labels, loss_mask,
                              runtime_gather_output, scale_logits, compute_language_model_loss, **_unused):
            """GPTModel's output_processor: [s, b, h] hidden states -> the subclass's per-token output, as
            megatron's own path computes it (output layer, logit scaling, compute_language_model_loss)."""
            fused = self.fused_output(hidden_states, labels, loss_mask)
            if fused is not None:
                return fused
            logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
            self.loss_mask_in_flight = loss_mask
            try:
                return compute_language_model_loss(labels, scale_logits(logits))
            finally:
                self.loss_mask_in_flight = None

    else:

        def _postprocess(self, hidden_states, *args, **kwargs):
            """0.16.1's private postprocessing with the loss mask held for compute_language_model_loss, or the
            subclass's fused output where it gives one."""
            bound = _POSTPROCESS_SIGNATURE.bind(self, hidden_states, *args, **kwargs).arguments
            labels, loss_mask = bound.get("labels"), bound.get("loss_mask")
            if self.post_process and labels is not None and bound.get("inference_context") is None:
                fused = self.fused_output(hidden_states, labels, loss_mask)
                if fused is not None:
                    return fused
            self.loss_mask_in_flight = loss_mask
            try:
                return super()._postprocess(hidden_states, *args, **kwargs)
            finally:
                self.loss_mask_in_flight = None


# GPTModel's parameters, to find labels / loss_mask / the inference context however megatron passes them.
_FORWARD_SIGNATURE = inspect.signature(GPTModel.forward)
_POSTPROCESS_SIGNATURE = inspect.signature(GPTModel._postprocess)
