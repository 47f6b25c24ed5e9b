"""The few collectives the checkpoint code makes itself, each a no-op without torch.distributed.

Why agreement collectives: a failure that only some ranks see (one rank's file is damaged, one rank's write
hits a full disk) must stop every rank with the same reason; a rank that raised alone would leave its peers
blocked in the next collective until the process group's timeout.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, Type

import torch.distributed as dist


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Collectives: one barrier over the default group."""
    if dist.is_initialized():
        dist.barrier()


def gather_from_all(value: Any) -> List[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank.

    Collectives: one all_gather_object over the default group.
    """
    if not dist.is_initialized():
        return [value]
    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` (picklable) on every rank. Collectives: one broadcast_object_list from rank 0."""
    if not dist.is_initialized():
        return value
    holder = [value if rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def first_failure(local_message: Optional[str]) -> Optional[str]:
    """The lowest failing rank's message on every rank; None when no rank failed.

    Each rank passes the reason it failed (None when it succeeded). Collectives: one all_gather_object.
    """
    return next((message for message in gather_from_all(local_message) if message is not None), None)


def on_rank0_for_all(action: Callable[[], Any], errors: Tuple[Type[BaseException], ...] = (ValueError,)) -> Any:
    """Run action() on rank 0 only; an `errors` exception it raises is raised on every rank.

    Returns action()'s result on rank 0 and None elsewhere. Any other exception propagates on rank 0, and the
    other ranks raise RuntimeError naming it (instead of waiting for rank 0 until the group's timeout).
    Collectives: one broadcast_object_list from rank 0 (the exception, pickled).
    """
    result, error, unexpected = None, None, None
    if rank() == 0:
        try:
            result = action()
        except errors as raised:
            error = raised
        except BaseException as raised:
            unexpected = raised
            error = RuntimeError(f"rank 0 failed: {type(raised).__name__}: {raised}")
    error = broadcast_from_rank0(error)
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise error
    return result
