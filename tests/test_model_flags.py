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
