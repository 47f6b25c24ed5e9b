"""MiLe, focal, cross-entropy and the other weighted losses inside the vocab-parallel cross-entropy.

- spec: the loss specification (LossSpec) and the registry of per-token weightings.
- selection: the top-share token selection of entropy_selection / ce_selection (histogram threshold over the
  micro-batch's loss-masked tokens, all-reduced over the data-parallel group).
- shard: the per-shard steps (target ownership, shifted sums, ce / entropy / weight, logit gradient) that
  both vocab-parallel paths are built from.
- vocab_parallel: the tensor-parallel per-token losses and weights on given logits (the default path).
- fused_linear_cross_entropy: the output layer and the loss in chunks, without the logits (--fused-lm-head);
  import its function from the module (the package attribute of that name is the module).
- reference: plain full-vocabulary implementations (tests, readers, benchmark baselines).
- reduction: per-micro-batch sums and the global normalisation L = sum(w * ce) / sum(w).
"""

from megatron_mile.loss.reduction import MicroBatchLoss, StepLoss, all_reduce_step_loss, reduce_micro_batch
from megatron_mile.loss.reference import reference_global_loss, reference_token_losses, reference_weighted_cross_entropy
from megatron_mile.loss.shard import DEFAULT_IGNORE_INDEX, TokenLosses
from megatron_mile.loss.spec import (
    CROSS_ENTROPY,
    LOSS_TYPES,
    LossSpec,
    TokenStatistics,
    loss_types,
    register_weighting,
)
from megatron_mile.loss.vocab_parallel import (
    CHUNK_ELEMENTS,
    vocab_parallel_cross_entropy,
    vocab_parallel_focal,
    vocab_parallel_mile,
    vocab_parallel_weighted_cross_entropy,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "CROSS_ENTROPY",
    "DEFAULT_IGNORE_INDEX",
    "LOSS_TYPES",
    "LossSpec",
    "MicroBatchLoss",
    "StepLoss",
    "TokenLosses",
    "TokenStatistics",
    "all_reduce_step_loss",
    "loss_types",
    "reduce_micro_batch",
    "reference_global_loss",
    "reference_token_losses",
    "reference_weighted_cross_entropy",
    "register_weighting",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_focal",
    "vocab_parallel_mile",
    "vocab_parallel_weighted_cross_entropy",
]
