"""Fill one rank's model chunk with the Hugging Face tensors' slices it owns.

Each parameter's global name (layer numbers made global from the pipeline stage) and this rank's
tensor-parallel position give its megatron_mile.llama_layout recipe; the recipe's pieces are read from the
safetensors files and copied into the parameter in place, padding rows zeroed. The whole Hugging Face
tensor is never read on a rank that holds a shard of it.
"""

from __future__ import annotations

import torch

from megatron_mile.hf_import.safetensors_source import SafetensorsSource
from megatron_mile.llama_layout import LlamaShape, shard_recipe, split_layer_name


def global_name(chunk, name: str) -> str:
    """`name` of a parameter of `chunk` (a pipeline stage) with its layer number made global."""
    layer, suffix = split_layer_name(name)
    if layer is None:
        return name
    # megatron's TransformerLayer.layer_number is global and 1-based.
    return f"decoder.layers.{chunk.decoder.layers[layer].layer_number - 1}.{suffix}"


def fill_chunk(chunk, source: SafetensorsSource, shape: LlamaShape, tp_rank: int, tp_size: int) -> None:
    """Overwrite every parameter of `chunk` (a MileGPTModel stage on TP rank `tp_rank` of `tp_size`).

    Raises ValueError for a parameter the Llama layout has no source for (the model was built with layers a
    Llama does not have) or whose shape differs from the layout's. No collectives.
    """
    with torch.no_grad():
        for name, param in chunk.named_parameters():
            full_name = global_name(chunk, name)
            try:
                recipe = shard_recipe(full_name, shape, tp_rank, tp_size)
            except KeyError:
                raise ValueError(f"the model has a parameter {full_name} that a Llama has no weight for") from None
            if tuple(param.shape) != recipe.shape:
                raise ValueError(f"{full_name} has shape {tuple(param.shape)} on TP rank {tp_rank}, the Llama "
                                 f"layout gives {recipe.shape}")
            offset = 0
            for piece in recipe.pieces:
                param.narrow(recipe.concat_dim, offset, piece.length).copy_(source.read(piece, param.dtype))
                offset += piece.length
            if recipe.padding:
                # Rows past the tokenizer: no token has them, and the loss and the export leave them out.
                param.narrow(recipe.concat_dim, offset, recipe.padding).zero_()
