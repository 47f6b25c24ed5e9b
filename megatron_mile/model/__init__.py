"""The model: megatron-core's GPTModel with the project's loss hook, and its output head.

- gpt: MileGPTModel (the loss where GPTModel computes its LM loss), layout-independent initialisation,
  megatron-core's TransformerConfig and layer spec for a run, and the model builder.
- output: the per-token [b, s, 5] (loss, ce, weight, entropy, z-loss) contract between the model and the loss
  function.
- fused_output_layer: the output layer and the loss as one fused linear cross-entropy (--fused-lm-head).
"""

from megatron_mile.model.gpt import (
    MileGPTModel,
    SeededTransformerLayer,
    build_model,
    build_model_chunk,
    request_entropy,
    set_loss_spec,
    transformer_config,
    transformer_layer_spec,
)
from megatron_mile.model.output import CE, ENTROPY, LOSS, WEIGHT, Z_LOSS, pack_token_losses

__all__ = [
    "CE",
    "ENTROPY",
    "LOSS",
    "WEIGHT",
    "Z_LOSS",
    "MileGPTModel",
    "SeededTransformerLayer",
    "build_model",
    "build_model_chunk",
    "pack_token_losses",
    "request_entropy",
    "set_loss_spec",
    "transformer_config",
    "transformer_layer_spec",
]
