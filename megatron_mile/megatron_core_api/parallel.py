"""megatron-core's parallel-state helpers whose signatures differ between the supported releases.

- `batch_on_this_context_parallel_rank(batch)`: megatron's ``get_batch_on_this_cp_rank``, this
  context-parallel rank's two of the 2 * CP chunks of every sequence (zigzag, so causal attention work is
  balanced). 0.16.1 takes ``(batch, cp_group=None)``; 0.19 adds a required ``is_hybrid_cp`` (hybrid context
  parallelism, which this project does not use: False) and routes a batch without ``cu_seqlens`` to the same
  per-sequence split.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict

from megatron.core.utils import get_batch_on_this_cp_rank

__all__ = ["batch_on_this_context_parallel_rank"]

# Whether the installed release takes the hybrid-CP switch (0.19), found from megatron's own signature.
_HYBRID_CP_PARAMETER = "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters


def batch_on_this_context_parallel_rank(batch: Dict[str, Any]) -> Dict[str, Any]:
    """{name: tensor [b, s, ...]} -> this CP rank's {name: tensor [b, 2 * s / (2 * CP), ...]}, split along the
    sequence dimension as megatron's get_batch_on_this_cp_rank does. No collectives."""
    if _HYBRID_CP_PARAMETER:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False)
    return get_batch_on_this_cp_rank(batch)
