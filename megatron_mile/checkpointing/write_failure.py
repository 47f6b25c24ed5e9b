"""What a save that could not write says: the failure in one line, and for a full disk or quota the bytes
the checkpoint needs and the bytes free. No collectives here (megatron_mile.checkpointing.save agrees on
the failure across ranks and removes the partial save).
"""

from __future__ import annotations

import errno
import shutil
import traceback
from pathlib import Path
from typing import Iterator, Optional, Tuple

from torch.distributed.checkpoint.api import CheckpointException

from megatron_mile.checkpointing.safe_load import safe_reason
from megatron_mile.checkpointing.tracker import checkpoint_name, read_latest_iteration

_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}


def describe_write_failure(error: BaseException, rank: int) -> Optional[Tuple[str, Optional[str]]]:
    """("rank R: Type: message", the no-space reason or None) when `error`, raised on `rank` while writing
    a checkpoint, is a failed write; None when it is something else (a bug).

    A failed write is an OSError, also when torch's zip writer reports it as a RuntimeError raised while
    handling it ("unexpected pos"), or torch's CheckpointException wrapping one; for the latter the rank is
    the one whose write failed inside it.
    """
    failures = getattr(error, "failures", None) if isinstance(error, CheckpointException) else None
    if failures:
        rank, (error, _) = min(failures.items(), key=lambda item: item[0])
    os_error = next((e for e in _chain(error) if isinstance(e, OSError)), None)
    if os_error is None:
        return None
    no_space = _NO_SPACE.get(os_error.errno)
    return f"rank {rank}: {safe_reason(os_error)}", no_space


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, its causes and contexts (torch wraps and re-raises)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def release_frames(error: BaseException) -> None:
    """Drop the local variables of the finished frames in the tracebacks of `error` and of every exception it
    carries (causes, contexts, a CheckpointException's per-rank failures). No collectives.

    Why: a write that failed inside torch's checkpoint writer leaves, in those frames, a memoryview of an
    ``io.BytesIO.getbuffer()`` in a reference cycle with the exception. CPython 3.12.0 and 3.12.1 crash with a
    segmentation fault when the garbage collector frees such a cycle (python/cpython gh-111049 / gh-111211:
    the BytesIO buffer is cleared before the view that exports it); a run on those interpreters died at its
    next collection instead of reporting the full disk. Cleared here, the frames free the view by reference
    counting, which releases it in the right order. Frames still executing are left as they are.
    """
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            pending += [wrapped for wrapped, _ in current.failures.values()]


def directory_bytes(directory: Path) -> int:
    """Total size of the files below `directory` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(directory: Path) -> int:
    """Bytes free on the file system of `directory` (or of its nearest existing parent)."""
    directory = Path(directory).absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def failed_save_message(save_dir: Path, iteration: int, detail: str, no_space: Optional[str],
                        state_bytes: int) -> str:
    """The one line a failed save stops every rank with; call after the partial save was removed.

    `detail` and `no_space` come from describe_write_failure; `state_bytes` is the tensor bytes all ranks
    were writing, the size estimate when no earlier checkpoint gives a better one.
    """
    try:
        latest = read_latest_iteration(save_dir)
    except (OSError, ValueError):
        latest = None
    kept = (f"the latest checkpoint is still {checkpoint_name(latest)}" if latest is not None
            else "no checkpoint was saved yet")
    head = f"cannot save iteration {iteration} to {save_dir}: "
    tail = f"The partial save was removed; {kept}."
    if no_space is None:
        return f"{head}a write failed ({detail}). {tail}"
    if latest is not None:
        needed, basis = directory_bytes(save_dir / checkpoint_name(latest)), f"the size of {checkpoint_name(latest)}"
    else:
        needed, basis = state_bytes, "the tensors being saved"
    return (f"{head}{no_space} ({detail}). It needs about {needed:,} bytes ({basis}); {free_bytes(save_dir):,} bytes "
            f"are free there. {tail} Free space or give --save another directory, then resume with --load")
