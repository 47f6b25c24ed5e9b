"""Megatron LLaMA weights and settings -> a Hugging Face LlamaForCausalLM state dict and config.json.

Layout differences handled here (single-process megatron names of megatron_mile.model's local layer spec):

- fused QKV: `self_attention.linear_qkv.weight` is [ng * (np/ng + 2) * d, h], grouped per query group g
  as [the np/ng query heads of g, the key head of g, the value head of g]; Llama keeps q_proj [np * d, h],
  k_proj and v_proj [ng * d, h] apart.
- fused SwiGLU: `mlp.linear_fc1.weight` is [2 * ffn, h] = [gate; up]; Llama has gate_proj and up_proj.
- norms: the local spec has separate `input_layernorm` / `pre_mlp_layernorm` modules; Transformer Engine
  specs fold them into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`. Both are read.
- RoPE: megatron's default (non-interleaved, rotate_half over the two halves of each head) is Llama's.
- vocabulary: megatron pads the embedding and output rows to a multiple of the TP size; the export keeps
  the real tokens only (vocab_size = the tokenizer's size). Why: the padded rows are never trained and
  take no part in the training loss, but a Llama softmax would spread probability over them, so every
  log-likelihood an evaluation computes would differ from the trained model's.
- tied embeddings: written as a separate lm_head copy (tie_word_embeddings stays false).

Pure mapping, no files: megatron_mile.export.hf_directory writes the directory; transformers is not imported.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch

from megatron_mile.config import ModelConfig


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


def hf_config(model: ModelConfig, vocab_size: int, dtype: torch.dtype, eos_token_id: Optional[int]) -> dict:
    """config.json of the LlamaForCausalLM (keys read by transformers 4.x and 5.x alike)."""
    rope_theta = float(model.rotary_base)
    rope = rope_parameters(model)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": _query_groups(model),
        "head_dim": model.hidden_size // model.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        # transformers < 5 reads rope_theta; 5.x reads rope_parameters (and converts rope_theta if alone).
        "rope_theta": rope_theta,
        "rope_parameters": rope,
        "rope_scaling": (None if rope["rope_type"] == "default"
                         else {key: value for key, value in rope.items() if key != "rope_theta"}),
        "attention_bias": False,
        "mlp_bias": False,
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
    h, heads, groups = model.hidden_size, model.num_attention_heads, _query_groups(model)
    d, ffn = h // heads, model.ffn_hidden_size
    per_group = heads // groups
    out: Dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor, shape: tuple) -> None:
        if tuple(tensor.shape) != shape:
            raise ExportError(f"{name}: expected shape {shape}, the checkpoint gives {tuple(tensor.shape)}")
        out[name] = tensor.contiguous().clone()

    embedding = _take(params, "embedding.word_embeddings.weight")  # [V_padded, h]
    put("model.embed_tokens.weight", embedding[:real_vocab_size], (real_vocab_size, h))
    if model.untie_embeddings_and_output_weights:
        output = _take(params, "output_layer.weight")  # [V_padded, h]
    else:
        output = params.pop("output_layer.weight", embedding)
    put("lm_head.weight", output[:real_vocab_size], (real_vocab_size, h))
    put("model.norm.weight", _take(params, "decoder.final_layernorm.weight"), (h,))

    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        put(dst + "input_layernorm.weight",
            _take(params, src + "input_layernorm.weight", src + "self_attention.linear_qkv.layer_norm_weight"), (h,))
        qkv = _take(params, src + "self_attention.linear_qkv.weight")  # [ng * (np/ng + 2) * d, h]
        if tuple(qkv.shape) != (groups * (per_group + 2) * d, h):
            raise ExportError(f"{src}self_attention.linear_qkv.weight has shape {tuple(qkv.shape)}, expected "
                              f"{(groups * (per_group + 2) * d, h)} for {heads} heads in {groups} query groups")
        qkv = qkv.view(groups, per_group + 2, d, h)  # [ng, np/ng + 2, d, h]
        put(dst + "self_attn.q_proj.weight", qkv[:, :per_group].reshape(heads * d, h), (heads * d, h))
        put(dst + "self_attn.k_proj.weight", qkv[:, per_group].reshape(groups * d, h), (groups * d, h))
        put(dst + "self_attn.v_proj.weight", qkv[:, per_group + 1].reshape(groups * d, h), (groups * d, h))
        put(dst + "self_attn.o_proj.weight", _take(params, src + "self_attention.linear_proj.weight"), (h, heads * d))
        put(dst + "post_attention_layernorm.weight",
            _take(params, src + "pre_mlp_layernorm.weight", src + "mlp.linear_fc1.layer_norm_weight"), (h,))
        fc1 = _take(params, src + "mlp.linear_fc1.weight")  # [2 * ffn, h] = [gate; up]
        if tuple(fc1.shape) != (2 * ffn, h):
            raise ExportError(f"{src}mlp.linear_fc1.weight has shape {tuple(fc1.shape)}, expected {(2 * ffn, h)} "
                              "(SwiGLU: gate and up stacked)")
        put(dst + "mlp.gate_proj.weight", fc1[:ffn], (ffn, h))
        put(dst + "mlp.up_proj.weight", fc1[ffn:], (ffn, h))
        put(dst + "mlp.down_proj.weight", _take(params, src + "mlp.linear_fc2.weight"), (h, ffn))

    if params:
        raise ExportError(f"the checkpoint holds weights a Llama has no place for: {sorted(params)[:8]}"
                          f"{' ...' if len(params) > 8 else ''}")
    return out
