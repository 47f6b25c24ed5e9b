"""MiLe, focal and cross-entropy losses inside the vocab-parallel cross-entropy.

- vocab_parallel: the tensor-parallel per-token losses and weights (the fast path).
- reference: plain full-vocabulary implementations (tests, readers, benchmark baselines).
- reduction: per-micro-batch sums and the global normalisation L = sum(w * ce) / sum(w).
"""

from megatron_mile.loss.reduction import MicroBatchLoss, StepLoss, all_reduce_step_loss, reduce_micro_batch
from megatron_mile.loss.reference import reference_global_loss, reference_weighted_cross_entropy
from megatron_mile.loss.vocab_parallel import (
    CHUNK_ELEMENTS,
    DEFAULT_IGNORE_INDEX,
    LOSS_TYPES,
    validate_loss_arguments,
    vocab_parallel_cross_entropy,
    vocab_parallel_focal,
    vocab_parallel_mile,
    vocab_parallel_weighted_cross_entropy,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "DEFAULT_IGNORE_INDEX",
    "LOSS_TYPES",
    "MicroBatchLoss",
    "StepLoss",
    "all_reduce_step_loss",
    "reduce_micro_batch",
    "reference_global_loss",
    "reference_weighted_cross_entropy",
    "validate_loss_arguments",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_focal",
    "vocab_parallel_mile",
    "vocab_parallel_weighted_cross_entropy",
]
