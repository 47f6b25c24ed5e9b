"""Optional per-step diagnostics of the log line and TensorBoard: the parameters' L2 norm
(--log-params-norm) and memory use (--log-memory-to-tensorboard). The number of zero gradient entries
(--log-num-zeros-in-grad) is counted by the optimizer step (megatron_mile.training.optimizer)."""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_mile import device


def _sum_of_squares(tensors: List[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device.compute_device())
    for tensor in tensors:
        total += torch.linalg.vector_norm(tensor.detach().float()).double() ** 2
    return total


def params_l2_norm(model: list, half_precision: bool) -> float:
    """L2 norm of all the model's parameters, over every rank, as Megatron-LM's calc_params_l2_norm.

    Each parameter counts once: tensor-parallel duplicates (norm weights, replicated biases) and the
    second copy of tied embeddings (`shared`) are left out. Under --bf16 / --fp16 the fp32 main weights are used;
    with the distributed optimizer each data-parallel rank holds a shard of them, so their squares are
    summed over the DP x CP group. Collectives, on every rank: an all-reduce of one value over the DP x CP
    group, then one over the model-parallel (TP x PP) group.
    """
    whole: List[torch.Tensor] = []
    sharded: List[torch.Tensor] = []
    for chunk in model:
        for param in chunk.parameters():
            if not (param_is_not_tensor_parallel_duplicate(param) and param_is_not_shared(param)):
                continue
            main = getattr(param, "main_param", None) if half_precision else None
            if half_precision and getattr(param, "main_param_sharded", False):
                if main is not None:  # this rank's shard of the fp32 weight (None: no part of it here)
                    sharded.append(main)
            else:
                whole.append(param if main is None else main)
    squares = _sum_of_squares(sharded)
    if dist.is_initialized():
        dist.all_reduce(squares, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    squares += _sum_of_squares(whole)
    if dist.is_initialized():
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return float(squares.sqrt())


def resident_set_bytes() -> int:
    """This process's resident set size in bytes (Linux /proc/self/statm), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def memory_scalars() -> Dict[str, float]:
    """The memory scalars of --log-memory-to-tensorboard for this process: torch.cuda's allocator
    statistics (Megatron-LM's tags) on a GPU, the resident set size on CPU. No collectives."""
    if device.compute_device().type == "cuda":
        stats = torch.cuda.memory_stats()
        return {
            "mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
            "mem-allocated-count": stats["allocation.all.current"],
        }
    return {"mem-rss-bytes": float(resident_set_bytes())}
