"""save_checkpoint: one iteration's model, optimizer, scheduler and RNG states, committed atomically.

Atomicity: every rank writes into ``{save}/iter_XXXXXXX.tmp-<run id>-<token>`` (one name, drawn by rank 0;
the run id is that of the directory's lock, megatron_mile.checkpointing.lock), all ranks meet at a barrier,
rank 0 renames the directory into place (megatron_mile.atomic_io) and only then replaces the
latest-iteration file. A crash mid-save leaves the previous checkpoint and the latest file untouched;
leftover temp directories are ignored by loading, and the run's next successful save removes its own.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mile import device
from megatron_mile.atomic_io import replace_directory, write_json_atomic
from megatron_mile.checkpointing.collectives import barrier, broadcast_from_rank0
from megatron_mile.checkpointing.collectives import rank as global_rank
from megatron_mile.checkpointing.compatibility import CheckpointError, optimizer_format, parallel_layout, vocab_sizes
from megatron_mile.checkpointing.lock import run_id_for
from megatron_mile.checkpointing.rng import save_rng_state
from megatron_mile.checkpointing.torch_dist import save_sharded, sharded_state_dict, unwrap_model
from megatron_mile.checkpointing.tracker import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILENAME,
    checkpoint_name,
    remove_leftovers,
    temp_checkpoint_name,
    write_latest_iteration,
)


def common_state(iteration: int, consumed_samples: int, model: list, optimizer, scheduler, config_dict: dict,
                 extra: Optional[dict] = None) -> dict:
    """Everything a checkpoint keeps besides tensors and RNG states, as plain data (mile_checkpoint.json).

    The one place that decides what that is: iteration, consumed samples, the run's config dict, the
    LR-scheduler state, the optimizer's state format, the parallel layout and the vocabulary sizes (which
    loading checks), and `extra` (JSON-serialisable data of the caller). No collectives.
    """
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
        "config": config_dict,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "has_optimizer": optimizer is not None,
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
                    config_dict: dict, extra: Optional[dict] = None) -> str:
    """Save model chunks, optimizer, scheduler, RNG states, consumed samples and config as `iteration`.

    Must be called on every rank. Returns the final checkpoint directory. `extra` is JSON-serialisable
    plain data stored alongside (e.g. the loop's counters). Raises CheckpointError, writing nothing, when
    any parameter is non-finite.

    Collectives (default group unless named): all-reduce of the non-finite flags; broadcast of the temp
    directory name from rank 0; barrier; those of torch.distributed.checkpoint.save and megatron's save
    validation (all-gathers of shard metadata); the distributed optimizer's gather of its state over the
    DP group when it is used; two barriers around rank 0's rename and tracker update.
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
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    barrier()

    save_sharded(sharded_state_dict(model, optimizer), tmp)
    # Made after the distributed save, which expects to start in an empty directory.
    save_rng_state(tmp)
    if rank == 0:
        metadata = common_state(iteration, consumed_samples, model, optimizer, scheduler, config_dict, extra)
        # Written last among rank 0's files: a directory with it has all of rank 0's parts.
        write_json_atomic(tmp / METADATA_FILENAME, metadata, indent=1, sort_keys=True)
    _before_commit(tmp)
    barrier()  # every rank's files are in tmp

    if rank == 0:
        _commit(save_dir, tmp, final, iteration, run_id)
    barrier()  # nobody returns (or exits) before the checkpoint is visible
    if rank == 0:
        print(f" saved checkpoint at iteration {iteration:7d} to {final}", flush=True)
    return str(final)


def _before_commit(tmp: Path) -> None:
    """Hook between writing and committing a save; tests replace it to simulate a crash there."""


def _commit(save_dir: Path, tmp: Path, final: Path, iteration: int, run_id: str) -> None:
    """Rank 0: move the finished temp directory into place, then point the tracker at it."""
    # Re-saving an iteration replaces the old copy; a crash between its two renames leaves iter_X missing
    # and the tracker naming it: loading then stops with a clear error (the old copy is in a .old- dir).
    replace_directory(tmp, final)
    write_latest_iteration(save_dir, iteration)
    # Leftovers of this run's saves that crashed before their rename are never loaded; clear them.
    remove_leftovers(save_dir, run_id, keep=tmp)
