"""--async-save: the training continues while a checkpoint's tensors are written in the background.

What happens when (megatron_mile.checkpointing.save.save_checkpoint with `async_group`):

1. At the save, on the training thread: the non-finite check, the temp directory, common.pt, the RNG states
   and the plain description are taken as of this iteration; every rank copies its tensor shards to CPU
   memory and hands them to a writer thread (torch.distributed.checkpoint.async_save). The step loop goes on.
2. After every later step, `PendingSave.finalize(blocking=False)` asks whether all ranks' writers are done
   (one all-reduce on the training thread). Only when they all are does the save finish exactly like a
   synchronous one: the ranks agree on whether any write failed (a failure removes the partial save on
   every rank alike), rank 0 writes the description, renames the directory into place and then moves the
   latest-iteration file. So every guarantee of a synchronous save holds: a kill while the writers run
   leaves the previous checkpoint as the latest, and loading never sees a half-written one.
3. A new save, an exit (signal, time budget, --exit-interval) and the end of the run wait for the
   pending save first (`finalize(blocking=True)`).

The writer threads' collectives (torch's save planning) run over a gloo group of all ranks that nothing
else uses (`checkpoint_group`), so they never interleave with the training's collectives. The price is one
CPU copy of this rank's shards while a save is in flight.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mile import device


def checkpoint_group():
    """A new gloo group of all ranks for the writer threads' collectives; None without torch.distributed.
    Collectives: group creation on every rank (call it on every rank, in the same order)."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")


class PendingSave:
    """An asynchronous save whose tensors are being written; `finalize` commits it once every rank is done."""

    def __init__(self, attempt, writing: Future, metadata: Optional[dict]):
        self.attempt = attempt  # megatron_mile.checkpointing.save._SaveAttempt of this save
        self.writing = writing  # this rank's writer thread
        self.metadata = metadata  # rank 0: mile_checkpoint.json as of the saved iteration
        self.iteration = attempt.iteration
        self.directory = str(attempt.final)

    def finalize(self, blocking: bool) -> bool:
        """Commit the checkpoint if every rank's writer is done (blocking: wait for them); True once committed.

        Raises CheckpointError on every rank when any rank's write failed (the partial save removed, the
        previous checkpoint still the latest). Collectives: one all-reduce (MIN) of one flag over the default
        group when not blocking; then those of the save's last phases (save_checkpoint).
        """
        if blocking:
            _wait(self.writing)
        else:
            done = torch.tensor([1 if self.writing.done() else 0], dtype=torch.int32, device=device.compute_device())
            if dist.is_initialized():
                dist.all_reduce(done, op=dist.ReduceOp.MIN)
            if int(done.item()) == 0:
                return False
        self.attempt.run(self.writing.result)  # a failed write on any rank fails the save on every rank
        self.attempt.finish(self.metadata)
        return True


def _wait(writing: Future) -> None:
    """Until this rank's writer is done; its error, if any, is raised by finalize's agreement."""
    try:
        writing.result()
    except BaseException:  # noqa: BLE001 - reported through the agreement, on every rank alike
        pass
