"""Where each weight of a megatron-core LLaMA (GPTModel, local layer spec) lives in a Hugging Face Llama state dict.

The one place that knows the mapping between the two formats; the export (megatron_mile.export.hf_llama: full
megatron tensors -> Llama tensors) and the import (megatron_mile.hf_import: Llama tensors -> each rank's
tensor-parallel shard) both read it, in opposite directions.

A megatron parameter, on tensor-parallel rank r of T, is described by a `ShardRecipe`: the slices of Llama
tensors that, concatenated along one dimension, make its local tensor. T = 1 describes the full
(single-process) tensor. Layout facts it encodes:

- fused QKV: `self_attention.linear_qkv.weight` is [ng * (np/ng + 2) * d, h], grouped per query group g as
  [the np/ng query heads of g; the key head of g; the value head of g]. TP shards whole groups: rank r
  holds groups [r * ng/T, (r + 1) * ng/T). Llama keeps q_proj [np * d, h], k_proj and v_proj [ng * d, h].
  Qwen2's query/key/value biases (megatron's --add-qkv-bias: `linear_qkv.bias`) follow the same rows.
- fused SwiGLU: `mlp.linear_fc1.weight` is [2 * ffn, h] = [gate; up], and TP rank r holds
  [gate rows of r; up rows of r] (megatron splits gate and up separately, not the fused tensor).
- row-parallel layers (`linear_proj`, `linear_fc2`) are split along their input columns; norms are whole.
- vocabulary: the embedding and output layer have V_padded rows (a multiple of --make-vocab-size-divisible-by
  times T), split in row blocks over TP; rows at or past the real vocabulary V have no Llama row (the
  import writes zeros there, the export drops them).
- tied embeddings: the output layer reads the Llama embedding (`model.embed_tokens.weight`).
- RoPE: megatron's default (non-interleaved, rotate_half over the two halves of each head) is Llama's, so
  query and key rows are copied unpermuted.

Pure index arithmetic over names and shapes: no files, no process groups, no transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

HF_EMBEDDING = "model.embed_tokens.weight"
HF_OUTPUT = "lm_head.weight"
# A buffer older transformers releases saved with the weights (recomputed from rope_theta, never a weight).
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Norm weights under Transformer Engine's layer spec (folded into the following linear layer), by the local
# spec's name: both spellings hold the same tensor.
TRANSFORMER_ENGINE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes the mapping depends on (megatron's names in brackets)."""

    num_layers: int
    hidden_size: int  # h
    num_attention_heads: int  # np
    num_query_groups: int  # ng: key/value heads
    head_dim: int  # d (kv_channels)
    ffn_hidden_size: int
    vocab_size: int  # V: real tokens (the tokenizer's size)
    padded_vocab_size: int  # V_padded: rows of the megatron embedding and output layer
    tied_embeddings: bool  # the output layer shares the embedding
    qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2; --add-qkv-bias)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """{Llama tensor name: shape} of every weight a Llama of this shape has (lm_head only when untied)."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_hidden_size
        shapes = {HF_EMBEDDING: (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tied_embeddings:
            shapes[HF_OUTPUT] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.num_attention_heads * d, h),
                p + "self_attn.k_proj.weight": (self.num_query_groups * d, h),
                p + "self_attn.v_proj.weight": (self.num_query_groups * d, h),
                p + "self_attn.o_proj.weight": (h, self.num_attention_heads * d),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            })
            if self.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (self.num_attention_heads * d,),
                               p + "self_attn.k_proj.bias": (self.num_query_groups * d,),
                               p + "self_attn.v_proj.bias": (self.num_query_groups * d,)})
        return shapes

    def megatron_names(self) -> List[str]:
        """Every parameter of the single-process megatron model (global layer numbers, local spec names)."""
        names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
        if not self.tied_embeddings:
            names.append("output_layer.weight")
        for i in range(self.num_layers):
            names += [f"decoder.layers.{i}.{suffix}" for suffix in _LAYER_SUFFIXES]
            if self.qkv_bias:
                names.append(f"decoder.layers.{i}.self_attention.linear_qkv.bias")
        return names


_LAYER_SUFFIXES = (
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)


@dataclass(frozen=True)
class Piece:
    """Indices [start, stop) along `dim` of the Llama tensor `hf_name` (all of its other dimensions)."""

    hf_name: str
    dim: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardRecipe:
    """How one megatron tensor (a TP shard, or the full tensor at T = 1) is made of Llama tensors.

    The local tensor of `shape` is the pieces concatenated along `concat_dim`, followed by zero rows up to
    its size there (only the vocabulary's padding has such rows).
    """

    shape: Tuple[int, ...]
    concat_dim: int
    pieces: Tuple[Piece, ...]

    @property
    def padding(self) -> int:
        """Rows after the pieces (megatron's vocabulary padding): zeros, with no Llama counterpart."""
        return self.shape[self.concat_dim] - sum(p.length for p in self.pieces)


def split_layer_name(name: str) -> Tuple[Optional[int], str]:
    """("decoder.layers.3.mlp.linear_fc1.weight") -> (3, "mlp.linear_fc1.weight"); (None, name) outside layers."""
    match = _LAYER_NAME.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def shard_recipe(name: str, shape: LlamaShape, tp_rank: int = 0, tp_size: int = 1) -> ShardRecipe:
    """The recipe of megatron parameter `name` (global layer number) on TP rank `tp_rank` of `tp_size`.

    Raises KeyError for a name this mapping does not know (a layer Llama has no place for, e.g. qk-layernorm
    or biases) and ValueError when `tp_size` does not divide what it splits.
    """
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        source = HF_EMBEDDING if name.startswith("embedding") or shape.tied_embeddings else HF_OUTPUT
        start, stop = _block(shape.padded_vocab_size, tp_rank, tp_size, "the padded vocabulary")
        real_stop = min(stop, shape.vocab_size)
        pieces = (Piece(source, 0, start, real_stop),) if real_stop > start else ()
        return ShardRecipe((stop - start, h), 0, pieces)
    if name == "decoder.final_layernorm.weight":
        return ShardRecipe((h,), 0, (Piece("model.norm.weight", 0, 0, h),))
    layer, suffix = split_layer_name(name)
    if layer is None or not 0 <= layer < shape.num_layers:
        raise KeyError(name)
    hf = f"model.layers.{layer}."
    if suffix == "input_layernorm.weight":
        return ShardRecipe((h,), 0, (Piece(hf + "input_layernorm.weight", 0, 0, h),))
    if suffix == "pre_mlp_layernorm.weight":
        return ShardRecipe((h,), 0, (Piece(hf + "post_attention_layernorm.weight", 0, 0, h),))
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        if suffix.endswith("bias") and not shape.qkv_bias:
            raise KeyError(name)
        kind = suffix.rsplit(".", 1)[1]  # weight [rows, h] or bias [rows]: the same rows
        first, last = _block(shape.num_query_groups, tp_rank, tp_size, "the query groups")
        per_group = shape.heads_per_group
        pieces = []
        for g in range(first, last):
            pieces += [Piece(f"{hf}self_attn.q_proj.{kind}", 0, g * per_group * d, (g + 1) * per_group * d),
                       Piece(f"{hf}self_attn.k_proj.{kind}", 0, g * d, (g + 1) * d),
                       Piece(f"{hf}self_attn.v_proj.{kind}", 0, g * d, (g + 1) * d)]
        rows = (last - first) * (per_group + 2) * d
        return ShardRecipe((rows, h) if kind == "weight" else (rows,), 0, tuple(pieces))
    if suffix == "self_attention.linear_proj.weight":
        start, stop = _block(shape.num_attention_heads * d, tp_rank, tp_size, "the attention heads")
        return ShardRecipe((h, stop - start), 1, (Piece(hf + "self_attn.o_proj.weight", 1, start, stop),))
    if suffix == "mlp.linear_fc1.weight":
        start, stop = _block(f, tp_rank, tp_size, "--ffn-hidden-size")
        pieces = (Piece(hf + "mlp.gate_proj.weight", 0, start, stop), Piece(hf + "mlp.up_proj.weight", 0, start, stop))
        return ShardRecipe((2 * (stop - start), h), 0, pieces)
    if suffix == "mlp.linear_fc2.weight":
        start, stop = _block(f, tp_rank, tp_size, "--ffn-hidden-size")
        return ShardRecipe((h, stop - start), 1, (Piece(hf + "mlp.down_proj.weight", 1, start, stop),))
    raise KeyError(name)


def _block(size: int, rank: int, parts: int, what: str) -> Tuple[int, int]:
    """[start, stop) of the rank-th of `parts` equal blocks of `size`."""
    if parts < 1 or size % parts:
        raise ValueError(f"tensor-parallel size {parts} does not divide {what} ({size})")
    step = size // parts
    return rank * step, (rank + 1) * step
