"""Megatron LLaMA weights and settings -> a Hugging Face LlamaForCausalLM state dict and config.json
(Qwen2ForCausalLM when the query/key/value projections have biases, --add-qkv-bias).

Where each megatron tensor goes (fused QKV grouped per query group, SwiGLU's fc1 = [gate; up], the
vocabulary padding, tied embeddings) is megatron_mile.llama_layout's, shared with the import; this module
applies it to the full (single-process) tensors of a checkpoint and checks that they are all there, with
the shapes the run's settings imply. Export choices:

- norms: Transformer Engine specs fold them into `linear_qkv.layer_norm_weight` /
  `linear_fc1.layer_norm_weight`; both spellings are read.
- vocabulary: only the real tokens are written (vocab_size = the tokenizer's size). Why: the padded rows
  are never trained and take no part in the training loss, but a Llama softmax would spread probability
  over them, so every log-likelihood an evaluation computes would differ from the trained model's.
- tied embeddings: written as a separate lm_head copy (tie_word_embeddings stays false).

Pure mapping, no files: megatron_mile.export.hf_directory writes the directory; transformers is not imported.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch

from megatron_mile.config import ModelConfig
from megatron_mile.llama_layout import TRANSFORMER_ENGINE_ALIASES, LlamaShape, shard_recipe, split_layer_name


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why and what to do."""


def check_llama_architecture(model: ModelConfig) -> None:
    """Raise ExportError listing every setting that a Hugging Face Llama cannot represent."""
    problems: List[str] = []
    if model.normalization != "RMSNorm":
        problems.append(f"normalization is {model.normalization}; Llama uses RMSNorm (--normalization RMSNorm)")
    if not model.swiglu:
        problems.append("the MLP is not gated (GeLU); Llama uses SwiGLU (--swiglu)")
    if not model.disable_bias_linear:
        problems.append("linear layers have biases; Llama has none (--disable-bias-linear)")
    if model.position_embedding_type != "rope":
        problems.append(f"position embeddings are {model.position_embedding_type}; Llama uses rope "
                        "(--position-embedding-type rope)")
    if model.use_rope_scaling and model.rotary_seq_len_interpolation_factor:
        problems.append("rope has both --use-rope-scaling and --rotary-seq-len-interpolation-factor; a Hugging "
                        "Face Llama takes one rope scaling")
    if problems:
        raise ExportError("the checkpoint is not a LLaMA-architecture model, so it has no Hugging Face Llama "
                          "equivalent:\n  - " + "\n  - ".join(problems))


def _query_groups(model: ModelConfig) -> int:
    return model.num_query_groups if model.group_query_attention else model.num_attention_heads


def rope_parameters(model: ModelConfig) -> dict:
    """transformers' rope parameters for the model's rotary embedding: megatron-core's Llama 3.x scaling
    (--use-rope-scaling: its fixed low/high frequency factors 1 and 4 and original context 8192) is
    transformers' llama3 type; --rotary-seq-len-interpolation-factor (positions / factor) its linear type."""
    theta = float(model.rotary_base)
    if model.use_rope_scaling:
        return {"rope_type": "llama3", "rope_theta": theta, "factor": float(model.rope_scaling_factor or 8.0),
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if model.rotary_seq_len_interpolation_factor:
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(model.rotary_seq_len_interpolation_factor)}
    return {"rope_type": "default", "rope_theta": theta}


def head_dim(model: ModelConfig) -> int:
    """Channels per attention head: --kv-channels, else hidden size / heads (megatron's default)."""
    return model.kv_channels or model.hidden_size // model.num_attention_heads


def llama_shape(model: ModelConfig, real_vocab_size: int, padded_vocab_size: int, tied: bool) -> LlamaShape:
    """The run's sizes as the shared megatron <-> Llama layout takes them."""
    return LlamaShape(num_layers=model.num_layers, hidden_size=model.hidden_size,
                      num_attention_heads=model.num_attention_heads, num_query_groups=_query_groups(model),
                      head_dim=head_dim(model), ffn_hidden_size=model.ffn_hidden_size, vocab_size=real_vocab_size,
                      padded_vocab_size=padded_vocab_size, tied_embeddings=tied, qkv_bias=model.add_qkv_bias)


def hf_config(model: ModelConfig, vocab_size: int, dtype: torch.dtype, eos_token_id: Optional[int]) -> dict:
    """config.json of the LlamaForCausalLM (keys read by transformers 4.x and 5.x alike); with --add-qkv-bias
    of the Qwen2ForCausalLM, Llama's architecture with biases on the query, key and value projections only."""
    rope_theta = float(model.rotary_base)
    rope = rope_parameters(model)
    if model.add_qkv_bias:
        # Qwen2 attends fully in every layer when use_sliding_window is false.
        architecture = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                        "sliding_window": None, "max_window_layers": model.num_layers}
    else:
        architecture = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                        "mlp_bias": False}
    return {
        **architecture,
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": _query_groups(model),
        "head_dim": head_dim(model),
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        # transformers < 5 reads rope_theta; 5.x reads rope_parameters (and converts rope_theta if alone).
        "rope_theta": rope_theta,
        "rope_parameters": rope,
        "rope_scaling": (None if rope["rope_type"] == "default"
                         else {key: value for key, value in rope.items() if key != "rope_theta"}),
        "attention_dropout": 0.0,
        "initializer_range": model.init_method_std,
        "tie_word_embeddings": False,
        "use_cache": True,
        # Training appends the end-of-document token to each document and adds no BOS.
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _take(params: Dict[str, torch.Tensor], *names: str) -> torch.Tensor:
    """Pop the first of `names` present (alternative spellings of one weight across layer specs)."""
    for name in names:
        if name in params:
            return params.pop(name)
    raise ExportError(f"the checkpoint has no {' or '.join(names)}: it does not hold the model its config describes")


def to_hf_state_dict(megatron_params: Mapping[str, torch.Tensor], model: ModelConfig,
                     real_vocab_size: int) -> Dict[str, torch.Tensor]:
    """Single-process megatron parameters -> Llama state dict (contiguous tensors, real vocabulary only).

    Raises ExportError when a weight is missing, has an unexpected shape, or is left over (a layer this
    mapping does not know, e.g. qk-layernorm or experts): better no export than a silently wrong one.
    """
    params = dict(megatron_params)
    embedding = _take(params, "embedding.word_embeddings.weight")  # [V_padded, h]
    if model.untie_embeddings_and_output_weights:
        output = _take(params, "output_layer.weight")  # [V_padded, h]
    else:
        output = params.pop("output_layer.weight", embedding)
    # Untied on the Llama side: the output layer (or the shared embedding) is written as lm_head.
    shape = llama_shape(model, real_vocab_size, embedding.shape[0], tied=False)
    full = {"embedding.word_embeddings.weight": embedding, "output_layer.weight": output}
    for name in shape.megatron_names():
        if name not in full:
            layer, suffix = split_layer_name(name)
            alias = TRANSFORMER_ENGINE_ALIASES.get(suffix)
            full[name] = _take(params, name, *([f"decoder.layers.{layer}.{alias}"] if alias else []))
    if params:
        raise ExportError(f"the checkpoint holds weights a Llama has no place for: {sorted(params)[:8]}"
                          f"{' ...' if len(params) > 8 else ''}")

    out = {name: torch.empty(size, dtype=embedding.dtype) for name, size in shape.hf_shapes().items()}
    for name, tensor in full.items():
        recipe = shard_recipe(name, shape)
        if tuple(tensor.shape) != recipe.shape:
            raise ExportError(f"{name} has shape {tuple(tensor.shape)}, expected {recipe.shape} for the run's "
                              f"settings ({shape.num_attention_heads} heads in {shape.num_query_groups} query "
                              f"groups of {shape.head_dim} channels, ffn {shape.ffn_hidden_size})")
        offset = 0
        for piece in recipe.pieces:
            out[piece.hf_name].narrow(piece.dim, piece.start, piece.length).copy_(
                tensor.narrow(recipe.concat_dim, offset, piece.length))
            offset += piece.length
    return out
