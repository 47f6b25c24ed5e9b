"""Vocabulary padding and the slice of it each tensor-parallel rank owns.

Megatron pads the vocabulary so that every tensor-parallel rank holds an equal, nicely aligned shard of
the embedding and output layer (`--make-vocab-size-divisible-by`, default 128, times the TP size). The
padded columns are never real tokens: the losses exclude them given the real `vocab_size`.
"""

from __future__ import annotations

from typing import Tuple


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1, divisible_by: int = 128) -> int:
    """Smallest multiple of divisible_by * tensor_model_parallel_size that holds vocab_size tokens."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if tensor_model_parallel_size < 1 or divisible_by < 1:
        raise ValueError(
            f"tensor_model_parallel_size ({tensor_model_parallel_size}) and divisible_by ({divisible_by}) "
            "must be >= 1"
        )
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def vocab_shard_range(padded_size: int, rank: int, tensor_model_parallel_size: int) -> Tuple[int, int]:
    """[start, end) of the padded vocabulary held by `rank`; the TP size must divide the padded size."""
    if tensor_model_parallel_size < 1 or padded_size % tensor_model_parallel_size:
        raise ValueError(
            f"tensor_model_parallel_size={tensor_model_parallel_size} does not divide the padded vocabulary "
            f"size {padded_size}: pad the vocabulary with padded_vocab_size(vocab_size, tp) "
            "(--make-vocab-size-divisible-by) or choose a TP size that divides it"
        )
    if not 0 <= rank < tensor_model_parallel_size:
        raise ValueError(f"rank {rank} is outside [0, {tensor_model_parallel_size})")
    shard = padded_size // tensor_model_parallel_size
    return rank * shard, (rank + 1) * shard
