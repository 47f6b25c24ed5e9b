"""Megatron-LM's architecture flags reach megatron-core's model with their meaning: the shapes they imply are
checked on the built model (a flag that was parsed and ignored would leave the default shapes)."""

from __future__ import annotations

import pytest

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from tiny_model import TINY_LLAMA


def model_facts(argv):
    """Worker body: shapes and switches of the first layer of the model the flags build."""
    from tiny_model import build_tiny_model, tiny_config

    config = tiny_config(argv)
    (chunk,) = build_tiny_model(config, 300)
    attention = chunk.decoder.layers[0].self_attention
    return {
        "qkv_out": attention.linear_qkv.weight.shape[0],
        "qkv_bias": getattr(attention.linear_qkv, "bias", None) is not None,
        "q_layernorm": type(attention.q_layernorm).__name__ not in ("NoneType", "IdentityOp"),
        "rotary_frequencies": chunk.rotary_pos_emb.inv_freq.numel(),
        "softmax_fp32": chunk.config.attention_softmax_in_fp32,
    }


def test_defaults_then_each_flag_changes_the_model(dist_pool):
    # hidden 64, 4 heads: head dim 16; q, k and v of 4 heads each (no GQA).
    default = dist_pool(1).run(model_facts, TINY_LLAMA)[0]
    assert default == {"qkv_out": 3 * 64, "qkv_bias": False, "q_layernorm": False, "rotary_frequencies": 8,
                       "softmax_fp32": False}
    changed = dist_pool(1).run(model_facts, TINY_LLAMA + [
        "--kv-channels", "8", "--rotary-percent", "0.5", "--qk-layernorm", "--add-qkv-bias",
        "--attention-softmax-in-fp32"])[0]
    # 3 * 4 heads * 8 channels; rope over half of 8 channels = 4 dimensions = 2 frequencies.
    assert changed == {"qkv_out": 3 * 4 * 8, "qkv_bias": True, "q_layernorm": True, "rotary_frequencies": 2,
                       "softmax_fp32": True}


@pytest.mark.parametrize("extra, message", [
    (["--attention-backend", "flash"], "--attention-backend flash needs a CUDA GPU"),
    (["--attention-backend", "fused"], "--attention-backend fused needs a CUDA GPU"),
    (["--apply-layernorm-1p"], "--apply-layernorm-1p needs a CUDA GPU"),
    (["--rotary-percent", "0"], "--rotary-percent must lie in"),
])
def test_gpu_only_and_bad_model_flags_stop_on_cpu(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY_LLAMA + extra, world_size=1, gpu_available=False)
    if "GPU" in message:
        parse_args(TINY_LLAMA + extra, world_size=1, gpu_available=True)  # fine on a GPU machine


def rotary_tables(argv, reference_kwargs):
    """Worker body: (the model's rotary inverse frequencies and its table for 32 positions, the same from
    megatron-core's own RotaryEmbedding built with reference_kwargs; None without reference_kwargs)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from tiny_model import build_tiny_model, tiny_config

    (chunk,) = build_tiny_model(tiny_config(argv), 300)
    ours = (chunk.rotary_pos_emb.inv_freq.tolist(), chunk.rotary_pos_emb(32).flatten().tolist())
    if reference_kwargs is None:
        return ours, None
    reference = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True,
                                **reference_kwargs)
    return ours, (reference.inv_freq.tolist(), reference(32).flatten().tolist())


@pytest.mark.parametrize("flags, reference_kwargs", [
    (["--use-rope-scaling"], dict(rope_scaling=True, rope_scaling_factor=8.0)),
    (["--use-rope-scaling", "--rope-scaling-factor", "4"], dict(rope_scaling=True, rope_scaling_factor=4.0)),
    (["--rotary-seq-len-interpolation-factor", "2"], dict(seq_len_interpolation_factor=2.0)),
])
def test_rope_scaling_flags_give_megatron_cores_rotary_tables(dist_pool, flags, reference_kwargs):
    # TINY_LLAMA: rope over heads of 16 channels (8 frequencies).
    plain, _ = dist_pool(1).run(rotary_tables, TINY_LLAMA, None)[0]
    ours, reference = dist_pool(1).run(rotary_tables, TINY_LLAMA + flags, reference_kwargs)[0]
    assert ours == reference
    assert ours[1] != plain[1]  # the flag changed the table


def test_use_rotary_position_embeddings_is_rope():
    learned = [a for a in TINY_LLAMA if a != "rope"]
    learned[learned.index("--position-embedding-type") + 1:learned.index("--position-embedding-type") + 1] = [
        "learned_absolute"]
    assert parse_args(learned).model.position_embedding_type == "learned_absolute"
    assert parse_args(learned + ["--use-rotary-position-embeddings"]).model.position_embedding_type == "rope"


def test_use_flash_attn_is_the_flash_attention_backend():
    config = parse_args(TINY_LLAMA + ["--use-flash-attn"], world_size=1, gpu_available=True)
    assert config.model.attention_backend == "flash"
    assert any(note.startswith("--use-flash-attn") for note in config.notes)
    with pytest.raises(ConfigError, match=r"--use-flash-attn \(--attention-backend flash\) needs a CUDA GPU"):
        parse_args(TINY_LLAMA + ["--use-flash-attn"], world_size=1, gpu_available=False)
    with pytest.raises(ConfigError, match="--use-flash-attn asks for --attention-backend flash"):
        parse_args(TINY_LLAMA + ["--use-flash-attn", "--attention-backend", "local"], world_size=1,
                   gpu_available=True)


@pytest.mark.parametrize("extra, message", [
    (["--rope-scaling-factor", "4"], "--rope-scaling-factor needs --use-rope-scaling"),
    (["--use-rope-scaling", "--position-embedding-type", "learned_absolute"], "--use-rope-scaling modifies rotary"),
    (["--rotary-seq-len-interpolation-factor", "0"], "--rotary-seq-len-interpolation-factor must be > 0"),
])
def test_rope_modifiers_without_their_rope_stop_at_start_up(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY_LLAMA + extra, world_size=1)


def test_exported_rope_scaling_is_transformers_llama3_and_linear(dist_pool):
    """The Hugging Face export names the same frequencies: transformers' own rope functions, given the
    exported parameters, compute megatron-core's inverse frequencies."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_mile.export.hf_llama import rope_parameters

    for flags in (["--use-rope-scaling", "--rope-scaling-factor", "4"], ["--rotary-seq-len-interpolation-factor", "2"]):
        config = parse_args(TINY_LLAMA + flags)
        params = rope_parameters(config.model)
        hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=params,
                                      max_position_embeddings=32)
        inv_freq, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
        (ours, _), _ = dist_pool(1).run(rotary_tables, TINY_LLAMA + flags, None)[0]
        if params["rope_type"] == "linear":  # transformers divides the frequencies, megatron the positions
            ours = [f / params["factor"] for f in ours]
        assert inv_freq.tolist() == pytest.approx(ours, rel=1e-6)
