"""Floating-point operations of one training step of the dense GPT, as Megatron-LM counts them for
`--log-throughput` (its num_floating_point_operations for a dense, non-MoE transformer).

Only the matrix multiplications count, each 2 * m * n * k operations, and each is done three times per
step: forward, backward with respect to the activations, backward with respect to the weights. Per token
and layer (h hidden size, q = kv_channels * heads, g = kv_channels * query groups, f ffn hidden size,
s sequence length, V padded vocabulary):

- attention projections: h * (q + 2 g) (query, key, value) + q * h (output);
- attention itself: q * s / 2 * 2 (scores QK^T and their product with V; causal: half the positions);
- MLP: 2 * h * f, or 3 * h * f with SwiGLU (its input projection is two matrices);

plus the logit layer, h * V per token. Norms, softmax, rotary embeddings and the loss are not counted, nor
is activation recomputation (--recompute-*): Megatron-LM reports the model's operations, not the hardware's.
"""

from __future__ import annotations

from megatron_mile.config.sections import ModelConfig

# Each GEMM runs three times per step: forward, the activation gradient and the weight gradient.
FORWARD_BACKWARD_FACTOR = 3
# A multiply-add is two floating-point operations.
FMA_FACTOR = 2


def num_floating_point_operations(model: ModelConfig, batch_size: int, padded_vocab_size: int) -> float:
    """Floating-point operations of one training step over `batch_size` sequences (the global batch).

    `model` must be finalized (RunConfig.finalize fills ffn_hidden_size and num_query_groups); the
    padded vocabulary (megatron_mile.vocab.padded_vocab_size) is the width of the logit layer.
    """
    h, s = model.hidden_size, model.seq_length
    kv_channels = model.kv_channels or h // model.num_attention_heads
    query = kv_channels * model.num_attention_heads
    key_value = kv_channels * model.num_query_groups
    ffn_matrices = 3 if model.swiglu else 2
    attention = h * (query + 2 * key_value) + query * s / 2 * 2 + query * h
    mlp = h * model.ffn_hidden_size * ffn_matrices
    per_token = FORWARD_BACKWARD_FACTOR * FMA_FACTOR * (
        model.num_layers * (attention + mlp) + h * padded_vocab_size)
    return float(batch_size * s * per_token)


def throughput_per_gpu(flops_per_iteration: float, seconds_per_iteration: float, world_size: int) -> float:
    """TFLOP/s per GPU (or per process on CPU), as Megatron-LM's log line reports it."""
    return flops_per_iteration / (seconds_per_iteration * 1e12 * world_size)
