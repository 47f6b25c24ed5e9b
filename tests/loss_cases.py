"""What the two loss test files share: the vocabularies, the loss settings and the TP coordinates.

tests/test_loss_vocab_parallel.py (the loss on given logits) and tests/test_loss_fused_linear_cross_entropy.py
(the fused output layer + loss) check the same losses against the same full-vocabulary reference.
"""

from __future__ import annotations

import itertools
from typing import Iterable, List, Optional, Sequence, Tuple

import torch.distributed as dist

from megatron_mile.loss import LossSpec

# (real vocabulary, padded vocabulary): no padding; padding in the last shard at TP 2/4; at TP 4 the last
# rank holds no real column at all.
VOCABS = [(64, 64), (50, 64), (40, 64)]
GAMMAS = (0.0, 0.5, 1.0, 2.0)


def tp_rank_size() -> Tuple[int, int]:
    """(tensor-parallel rank, size) in a worker, (0, 1) in a process without torch.distributed."""
    if not dist.is_initialized():
        return 0, 1
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def loss_specs(loss_type: str, mile_sigmas: Sequence[float] = (1.0,),
               mile_extra: Iterable[Tuple[float, float, Optional[float]]] = ()) -> List[LossSpec]:
    """The settings worth checking for one loss type: cross-entropy once; focal at every gamma; MiLe at
    every gamma x sigma in `mile_sigmas`, plus the (gamma, sigma, entropy_threshold) cases of `mile_extra`."""
    if loss_type == "cross_entropy":
        return [LossSpec("cross_entropy")]
    if loss_type == "focal":
        return [LossSpec("focal", g) for g in GAMMAS]
    grid = [LossSpec("mile", g, s) for g, s in itertools.product(GAMMAS, mile_sigmas)]
    return grid + [LossSpec("mile", g, s, t) for g, s, t in mile_extra]
