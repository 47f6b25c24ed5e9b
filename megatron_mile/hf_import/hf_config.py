"""A Hugging Face model's config.json -> the LLaMA it describes, or one line saying which field is not supported.

Accepted: LlamaForCausalLM (LLaMA 2 / 3) and MistralForCausalLM configs whose architecture is LLaMA's
(RMSNorm, SwiGLU with SiLU, RoPE, no biases, full attention), and Qwen2ForCausalLM (the same with
biases on the query, key and value projections: megatron's --add-qkv-bias); grouped-query attention, a head
dimension other than hidden / heads (megatron's --kv-channels), tied or untied embeddings. Refused, each
naming the field: rope_scaling / rope_parameters of a type megatron-core's rotary embedding does not
compute (accepted: default; llama3 with megatron-core's fixed low/high frequency factors 1 and 4 and original
context 8192, as LLaMA 3.1+ has it: --use-rope-scaling --rope-scaling-factor; linear: --rotary-seq-len-
interpolation-factor; refused: dynamic, yarn, longrope, llama3 with other constants), an active sliding window, Llama's attention_bias (it also puts a bias on the output projection) or
mlp_bias, a non-SiLU activation, quantized weights, other model types.

Both spellings of the rotary settings are read: rope_theta / rope_scaling (transformers 4) and
rope_parameters (transformers 5).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

CONFIG_FILENAME = "config.json"

# model_type -> the architecture name transformers writes for it.
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Model types whose attention always has query/key/value biases (and no other).
QKV_BIAS_MODEL_TYPES = ("qwen2",)


class HFImportError(ValueError):
    """The Hugging Face directory cannot be imported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class HFLlamaConfig:
    """The settings of a Llama-architecture config.json, in megatron's terms."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    """Rows of the embedding (and lm_head) in the weights."""
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: int
    tied_embeddings: bool
    attention_dropout: float
    qkv_bias: bool
    """Biases on the query, key and value projections (Qwen2): --add-qkv-bias."""
    rope_scaling_factor: Optional[float] = None
    """LLaMA 3.1's frequency scaling (rope_type llama3): --use-rope-scaling --rope-scaling-factor."""
    rotary_seq_len_interpolation_factor: Optional[float] = None
    """Linear position interpolation (rope_type linear): --rotary-seq-len-interpolation-factor."""

    @property
    def kv_channels(self) -> Optional[int]:
        """--kv-channels when the head dimension is not megatron's default hidden / heads, else None."""
        return None if self.head_dim * self.num_attention_heads == self.hidden_size else self.head_dim


def _field(config: dict, name: str, kind=int, default=None):
    value = config.get(name)
    value = default if value is None else value  # an absent field and a null one both take the default
    if value is None:
        raise HFImportError(f"config.json: {name} is missing; a Llama config needs it")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise HFImportError(f"config.json: {name} is {value!r}; expected a positive integer")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                          or value < 0):
        raise HFImportError(f"config.json: {name} is {value!r}; expected a non-negative number")
    return value


# The constants megatron-core's RotaryEmbedding uses for LLaMA 3.1's scaling (only the factor is a setting).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_scaling(field_name: str, value: dict) -> Tuple[Optional[float], Optional[float]]:
    """(llama3 factor, linear factor) of one rope_scaling / rope_parameters object; HFImportError for a type
    or a constant megatron-core's rotary embedding does not compute."""
    kind = value.get("rope_type", value.get("type", "default"))
    if kind in (None, "default"):
        return None, None
    factor = value.get("factor")
    if kind not in ("llama3", "linear"):
        raise HFImportError(
            f"config.json: {field_name} has rope_type {kind!r}: megatron-core's rotary embedding computes default, "
            "llama3 and linear RoPE only; the model's positions would be encoded differently")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise HFImportError(f"config.json: {field_name} factor is {factor!r}; expected a positive number")
    if kind == "linear":
        return None, float(factor)
    for key, expected in MEGATRON_LLAMA3_ROPE.items():
        if float(value.get(key, float("nan"))) != expected:
            raise HFImportError(
                f"config.json: {field_name} {key} is {value.get(key)!r}: megatron-core's llama3 RoPE scaling is "
                f"fixed at {expected:g}; the model's positions would be encoded differently")
    return float(factor), None


def _rope(config: dict) -> Tuple[int, Optional[float], Optional[float]]:
    """(rope_theta as an integer for --rotary-base, llama3 scaling factor, linear interpolation factor)."""
    parameters = config.get("rope_parameters")
    found = set()
    for field_name, value in (("rope_scaling", config.get("rope_scaling")), ("rope_parameters", parameters)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise HFImportError(f"config.json: {field_name} is {value!r}; expected an object or null")
        found.add(_rope_scaling(field_name, value))
    # transformers 5 may write both spellings; they must agree (a disagreement is a hand-edited config).
    if len(found) > 1:
        raise HFImportError("config.json: rope_scaling and rope_parameters describe different RoPE scalings")
    llama3, linear = found.pop() if found else (None, None)
    parameters = parameters or {}
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0 or float(theta) != int(theta):
        raise HFImportError(f"config.json: rope_theta is {theta!r}; --rotary-base takes a positive integer")
    return int(theta), llama3, linear


def _sliding_window_active(config: dict, max_positions: int) -> bool:
    if "sliding_attention" in (config.get("layer_types") or ()):
        return True
    window = config.get("sliding_window")
    if window is None or config.get("use_sliding_window") is False:
        return False
    return int(window) < max_positions


def parse_hf_config(config: dict) -> HFLlamaConfig:
    """The Llama settings of a config.json's content; HFImportError naming the first unsupported field."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFImportError(
            f"config.json: model_type is {model_type!r}; only {sorted(SUPPORTED_MODEL_TYPES)} (the LLaMA "
            "architecture) are imported")
    architectures = config.get("architectures") or [SUPPORTED_MODEL_TYPES[model_type]]
    if architectures != [SUPPORTED_MODEL_TYPES[model_type]]:
        raise HFImportError(f"config.json: architectures is {architectures}; only "
                            f"[{SUPPORTED_MODEL_TYPES[model_type]!r}] (a causal language model) is imported")
    if config.get("quantization_config") is not None:
        raise HFImportError("config.json: quantization_config is set; import the unquantized weights")
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise HFImportError(f"config.json: hidden_act is {activation!r}; the project's SwiGLU (--swiglu) uses silu")
    for bias in ("attention_bias", "mlp_bias"):
        if config.get(bias):
            raise HFImportError(f"config.json: {bias} is true; the LLaMA layers here have no biases "
                                "(--disable-bias-linear)")
    hidden = _field(config, "hidden_size")
    heads = _field(config, "num_attention_heads")
    groups = _field(config, "num_key_value_heads", default=heads)
    if heads % groups:
        raise HFImportError(f"config.json: num_key_value_heads {groups} does not divide num_attention_heads {heads}")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise HFImportError(f"config.json: num_attention_heads {heads} does not divide hidden_size {hidden} "
                                "and head_dim is not given")
        head_dim = hidden // heads
    head_dim = _field({"head_dim": head_dim}, "head_dim")
    max_positions = _field(config, "max_position_embeddings")
    if _sliding_window_active(config, max_positions):
        raise HFImportError(
            f"config.json: sliding_window is {config.get('sliding_window')} (< max_position_embeddings "
            f"{max_positions}, or layer_types with sliding_attention): this project's attention is full causal "
            "attention, which would see further back")
    rotary_base, rope_scaling_factor, interpolation_factor = _rope(config)
    return HFLlamaConfig(
        num_layers=_field(config, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_field(config, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=_field(config, "vocab_size"),
        max_position_embeddings=max_positions,
        norm_epsilon=float(_field(config, "rms_norm_eps", float)),
        rotary_base=rotary_base,
        # LlamaConfig's, MistralConfig's and Qwen2Config's default: untied.
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_dropout=float(_field(config, "attention_dropout", float, default=0.0)),
        qkv_bias=model_type in QKV_BIAS_MODEL_TYPES,
        rope_scaling_factor=rope_scaling_factor,
        rotary_seq_len_interpolation_factor=interpolation_factor,
    )


def read_hf_config(hf_dir: Path) -> HFLlamaConfig:
    """parse_hf_config of `hf_dir`/config.json; HFImportError when it is missing or not JSON."""
    path = Path(hf_dir) / CONFIG_FILENAME
    if not Path(hf_dir).is_dir():
        raise HFImportError(f"--hf {hf_dir} is not a directory (expected a Hugging Face model directory)")
    if not path.is_file():
        raise HFImportError(f"{path} is missing: --hf must be a Hugging Face model directory with its config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HFImportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path} does not hold a JSON object")
    return parse_hf_config(config)


def model_flags(model: HFLlamaConfig, make_vocab_size_divisible_by: int) -> List[str]:
    """pretrain_gpt_mile.py's flags for the model `model` describes (Megatron-LM's names).

    --seq-length is the model's context; a run may train on shorter sequences. Dropout: LLaMA has no hidden
    dropout, and attention dropout as the config says.
    """
    flags = [
        "--num-layers", str(model.num_layers),
        "--hidden-size", str(model.hidden_size),
        "--ffn-hidden-size", str(model.ffn_hidden_size),
        "--num-attention-heads", str(model.num_attention_heads),
    ]
    if model.num_query_groups != model.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(model.num_query_groups)]
    if model.kv_channels is not None:
        flags += ["--kv-channels", str(model.kv_channels)]
    flags += [
        "--max-position-embeddings", str(model.max_position_embeddings),
        "--seq-length", str(model.max_position_embeddings),
        "--position-embedding-type", "rope", "--rotary-base", str(model.rotary_base),
        *(["--use-rope-scaling", "--rope-scaling-factor", repr(model.rope_scaling_factor)]
          if model.rope_scaling_factor is not None else []),
        *(["--rotary-seq-len-interpolation-factor", repr(model.rotary_seq_len_interpolation_factor)]
          if model.rotary_seq_len_interpolation_factor is not None else []),
        "--normalization", "RMSNorm", "--norm-epsilon", repr(model.norm_epsilon),
        "--swiglu", "--disable-bias-linear", *(["--add-qkv-bias"] if model.qkv_bias else []),
        "--hidden-dropout", "0.0", "--attention-dropout", repr(model.attention_dropout),
        "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by),
    ]
    if not model.tied_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    return flags
