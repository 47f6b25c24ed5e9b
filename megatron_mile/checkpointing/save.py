"""save_checkpoint: one iteration's model, optimizer, scheduler and RNG states, committed atomically.

Atomicity: every rank writes into ``{save}/iter_XXXXXXX.tmp-<run id>-<token>`` (one name, drawn by rank 0;
the run id is that of the directory's lock, megatron_mile.checkpointing.lock), all ranks meet at a barrier,
rank 0 renames the directory into place (megatron_mile.atomic_io) and only then replaces the
latest-iteration file. A crash mid-save leaves the previous checkpoint and the latest file untouched;
leftover temp directories are ignored by loading, and the run's next successful save removes its own.

A write that fails (full disk, quota, I/O error) on any rank fails the save on every rank: after each
phase of writing the ranks agree on the outcome, rank 0 removes the partial save, and every rank raises
CheckpointError with the same line (megatron_mile.checkpointing.write_failure), the previous checkpoint
untouched and still the latest.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_mile import device
from megatron_mile.atomic_io import replace_directory, write_json_atomic
from megatron_mile.checkpointing import torch_dist
from megatron_mile.checkpointing.async_save import PendingSave
from megatron_mile.checkpointing.collectives import barrier, broadcast_from_rank0, gather_from_all
from megatron_mile.checkpointing.collectives import rank as global_rank
from megatron_mile.checkpointing.compatibility import CheckpointError, optimizer_format, parallel_layout, vocab_sizes
from megatron_mile.checkpointing.lock import run_id_for
from megatron_mile.checkpointing.megatron_lm import megatron_lm_common_state
from megatron_mile.checkpointing.rng import RNG_STATE_KEY, rng_state_object, save_rng_state
from megatron_mile.checkpointing.torch_dist import sharded_state_dict, unwrap_model
from megatron_mile.checkpointing.tracker import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILENAME,
    checkpoint_name,
    read_latest_iteration,
    remove_leftovers,
    temp_checkpoint_name,
    write_latest_iteration,
)
from megatron_mile.checkpointing.safe_load import safe_reason
from megatron_mile.checkpointing.write_failure import describe_write_failure, failed_save_message, release_frames


def common_state(iteration: int, consumed_samples: int, model: list, optimizer, scheduler, config_dict: dict,
                 extra: Optional[dict] = None, consumed_valid_samples: int = 0, has_rng: bool = True,
                 num_floating_point_operations_so_far: int = 0) -> dict:
    """Everything a checkpoint keeps besides tensors and RNG states, as plain data (mile_checkpoint.json).

    The one place that decides what that is: iteration, consumed training and validation samples (a
    resumed run continues both where they stopped), the floating-point operations trained so far
    (Megatron-LM's counter, continued the same way), the run's config dict, the LR-scheduler state, the
    optimizer's state format, whether RNG states were saved, the parallel layout and the vocabulary sizes
    (which loading checks), and
    `extra` (JSON-serialisable data of the caller). No collectives.
    """
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
        "consumed_valid_samples": int(consumed_valid_samples),
        "num_floating_point_operations_so_far": int(num_floating_point_operations_so_far),
        "config": config_dict,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "has_optimizer": optimizer is not None,
        "has_rng": bool(has_rng),
        "optimizer_format": optimizer_format(optimizer),
        "layout": parallel_layout(),
        "vocab": vocab_sizes(model),
        "extra": extra or {},
    }


def check_finite(model: list) -> None:
    """Raise CheckpointError on every rank when any rank holds a non-finite parameter.

    Collectives: one all-reduce (SUM) of a world-sized int tensor over the default group.
    """
    bad = [
        f"model{index}.{name}"
        for index, chunk in enumerate(model)
        for name, param in unwrap_model(chunk).named_parameters()
        if not bool(torch.isfinite(param.detach()).all())
    ]
    world = dist.get_world_size() if dist.is_initialized() else 1
    flags = torch.zeros(world, dtype=torch.int32, device=device.compute_device())
    flags[global_rank()] = len(bad)
    if dist.is_initialized():
        dist.all_reduce(flags)
    bad_ranks = [r for r in range(world) if int(flags[r]) > 0]
    if bad_ranks:
        here = f"; on this rank: {bad[:8]}{' ...' if len(bad) > 8 else ''}" if bad else ""
        raise CheckpointError(
            f"refusing to save: non-finite (NaN/inf) parameters on rank(s) {bad_ranks}{here}. Nothing was "
            "written; resume from the last good checkpoint with a lower --lr"
        )


def save_checkpoint(save_dir, iteration: int, model: list, optimizer, scheduler, consumed_samples: int,
                    config_dict: dict, extra: Optional[dict] = None, consumed_valid_samples: int = 0,
                    save_rng: bool = True, async_group=None, num_floating_point_operations_so_far: int = 0):
    """Save model chunks, optimizer, scheduler, RNG states, consumed samples and config as `iteration`.

    Must be called on every rank. Returns the final checkpoint directory. `optimizer` None saves no
    optimizer state (--no-save-optim); `save_rng` False no RNG states (--no-save-rng: neither the per-rank files
    nor Megatron-LM's rng_state object). common.pt also holds Megatron-LM's common items
    (megatron_mile.checkpointing.megatron_lm), `num_floating_point_operations_so_far` among them. `extra` is JSON-serialisable
    plain data stored alongside (e.g. the loop's counters); `consumed_valid_samples` the validation samples
    evaluated so far (read back with read_checkpoint_metadata). Raises CheckpointError on every rank, writing
    nothing, when any parameter is non-finite; and, having removed the partial save, when a write fails on
    any rank (one line naming the directory, and for a full disk the bytes needed and free).

    With `async_group` (--async-save; a gloo group of all ranks, megatron_mile.checkpointing.async_save) the
    tensors are copied to CPU memory and written by a background thread: this returns a PendingSave at once,
    and the checkpoint is committed by its finalize(), never before every rank's files are written.

    Collectives (default group unless named): all-reduce of the non-finite flags; broadcast of the temp
    directory name from rank 0; megatron's save validation (all-gathers of shard metadata); the
    distributed optimizer's gather of its state over the DP group when it is used; those of
    torch.distributed.checkpoint.save (over `async_group`, from the background thread, when given); an
    all_gather_object after each of the four phases (start, tensors, RNG and description, commit); one
    barrier before the commit; on failure, a broadcast of the message.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    save_dir = Path(save_dir)
    check_finite(model)
    rank = global_rank()

    # One temp name for all ranks: rank 0 draws it, everyone receives it.
    run_id = run_id_for(save_dir) if rank == 0 else None
    tmp_name = broadcast_from_rank0(temp_checkpoint_name(iteration, run_id, secrets.token_hex(6)) if rank == 0 else None)
    final = save_dir / checkpoint_name(iteration)
    tmp = save_dir / tmp_name
    state = sharded_state_dict(model, optimizer)
    # Megatron-LM's common items (args, iteration, scheduler, ...): its loader and megatron-core's find them.
    state.update(megatron_lm_common_state(config_dict, parallel_layout(), vocab_sizes(model), iteration,
                                          consumed_samples, consumed_valid_samples, scheduler,
                                          torch_dist.content_metadata(), num_floating_point_operations_so_far))
    if save_rng:  # Megatron-LM's rng_state object, which its loader reads (the per-rank files are this project's)
        state[RNG_STATE_KEY] = rng_state_object()
    sharded, common = torch_dist.prepare_save(state)
    attempt = _SaveAttempt(save_dir, tmp, final, iteration, torch_dist.main_replica_bytes(sharded), run_id)
    # Taken now: by the time an asynchronous save commits, the scheduler and the RNG streams have moved on.
    metadata = common_state(iteration, consumed_samples, model, optimizer, scheduler, config_dict, extra,
                            consumed_valid_samples, has_rng=save_rng,
                            num_floating_point_operations_so_far=num_floating_point_operations_so_far,
                            ) if rank == 0 else None

    def start() -> None:
        if rank == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            torch_dist.write_common(common, tmp)

    attempt.run(start)
    # The RNG states of now (the agreement after `start` guarantees the directory exists on every rank).
    attempt.run(lambda: save_rng_state(tmp) if save_rng else None)
    if async_group is not None:
        return PendingSave(attempt, torch_dist.write_sharded_async(sharded, tmp, async_group), metadata)
    attempt.run(lambda: torch_dist.write_sharded(sharded, tmp))
    attempt.finish(metadata)
    return str(final)


def _before_commit(tmp: Path) -> None:
    """Hook between writing and committing a save; tests replace it to simulate a crash there."""


class _SaveAttempt:
    """One save's phases, each followed by the ranks' agreement on whether a write failed."""

    def __init__(self, save_dir: Path, tmp: Path, final: Path, iteration: int, local_bytes: int,
                 run_id: Optional[str]) -> None:
        self.save_dir, self.tmp, self.final, self.iteration = save_dir, tmp, final, iteration
        self.local_bytes = local_bytes  # this rank's tensor bytes: the size estimate without a previous save
        self.run_id = run_id  # rank 0: the run's id (its leftover temp directories are removed at the commit)
        self.placed = False  # rank 0: the temp directory was renamed to the final name

    def finish(self, metadata: Optional[dict]) -> None:
        """After every rank's tensors are written: rank 0's description and format tag, then the commit.
        Collectives: an all_gather_object after each phase, a barrier between them."""
        def describe() -> None:
            if global_rank() == 0:
                torch_dist.write_format_tag(self.tmp)
                # Written last among rank 0's files: a directory with it has all of rank 0's parts.
                write_json_atomic(self.tmp / METADATA_FILENAME, metadata, indent=1, sort_keys=True)

        self.run(describe)
        _before_commit(self.tmp)
        barrier()  # every rank's files are in tmp
        # The agreement after the commit also keeps every rank from returning before the checkpoint is visible.
        self.run(lambda: self.commit() if global_rank() == 0 else None)
        if global_rank() == 0:
            print(f" saved checkpoint at iteration {self.iteration:7d} to {self.final}", flush=True)

    def run(self, phase: Callable[[], None]) -> None:
        """Run `phase` on every rank, then agree: when any rank's write failed, rank 0 removes the partial
        save and every rank raises the same CheckpointError. Collectives: one all_gather_object, and on
        failure one broadcast."""
        failure, unexpected = None, None
        try:
            phase()
        except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
            failure = describe_write_failure(error, global_rank())
            if failure is None:  # a bug, not the disk: re-raised below, after agreeing, so no rank waits forever
                failure, unexpected = (f"rank {global_rank()}: {safe_reason(error)}", None), error
            else:  # reported as one line: its frames are not needed (and crash CPython 3.12.1's gc, see there)
                release_frames(error)
        outcomes = gather_from_all((failure, self.local_bytes))
        failed = [outcome for outcome, _ in outcomes if outcome is not None]
        if not failed:
            return
        message = None
        if global_rank() == 0:
            self._remove_partial_save()
            detail, no_space = failed[0]
            message = failed_save_message(self.save_dir, self.iteration, detail, no_space,
                                          sum(size for _, size in outcomes))
        message = broadcast_from_rank0(message)
        if unexpected is not None:
            raise unexpected
        raise CheckpointError(message) from None

    def commit(self) -> None:
        """Rank 0: move the finished temp directory into place, then point the tracker at it."""
        # Re-saving an iteration replaces the old copy; a crash between its two renames leaves iter_X missing
        # and the tracker naming it: loading then stops with a clear error (the old copy is in a .old- dir).
        replace_directory(self.tmp, self.final)
        self.placed = True
        write_latest_iteration(self.save_dir, self.iteration)
        # Leftovers of this run's saves that crashed before their rename are never loaded; clear them.
        remove_leftovers(self.save_dir, self.run_id, keep=self.tmp)

    def _remove_partial_save(self) -> None:
        """Rank 0: delete what this save wrote; a placed directory only when the tracker does not name it."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.placed:
            try:
                tracked = read_latest_iteration(self.save_dir) == self.iteration
            except ValueError:
                tracked = False
            if not tracked:
                shutil.rmtree(self.final, ignore_errors=True)
