"""Checkpoints: save, resume and load weights, in Megatron-LM's directory layout and torch_dist format.

Layout of a save directory::

    {dir}/latest_checkpointed_iteration.txt     the newest complete iteration, as a decimal integer
    {dir}/iter_0000100/                         one checkpoint
        metadata.json, common.pt, .metadata,    megatron-core distributed checkpoint (torch_dist) of the
        __<rank>_0.distcp                         model chunks, the optimizer and Megatron-LM's rng_state
                                                  object; common.pt also holds Megatron-LM's common items
                                                  (args, iteration, scheduler, FLOPs so far)
        mile_checkpoint.json                    plain data: iteration, consumed training and validation
                                                  samples, FLOPs so far, the run's config, LR-scheduler state,
                                                  parallel layout, vocabulary sizes
        rng/rank_00000.pt ...                   per-rank RNG states (python, numpy, torch CPU/CUDA and
                                                  megatron's model-parallel tracker)
    {dir}/iter_0000200.tmp-<run>-<hex>/         a save in progress, or one that crashed: never loaded
    {dir}/megatron_mile.lock                    the run writing the directory (host, pid, start, run id)

Modules: policy first, format last.

- `async_save`: --async-save, the commit of a checkpoint written in the background.
- `save` / `load`: the orchestration (save_checkpoint, load_checkpoint, read_training_progress,
  load_model_weights), for this project's checkpoints and Megatron-LM's; `save.common_state` is the one place
  that decides the plain data stored with the tensors.
- `tracker`: iteration directory names, the latest-iteration tracker file, finding the checkpoint to load,
  reading mile_checkpoint.json (no collectives, no torch).
- `compatibility`: whether a checkpoint fits this run (architecture, vocabulary, optimizer state, layout).
- `scheduler`: the learning-rate schedule and Adam settings across a resume (refuse a difference, or take the
  flags' / the checkpoint's: --override-opt_param-scheduler, --use-checkpoint-opt_param-scheduler).
- `megatron_lm`: Megatron-LM's common state (what common.pt also holds for its loader) and reading the
  checkpoints Megatron-LM writes (their args, a one-line description, what a resume takes from them, whether
  their optimizer state fits).
- `rng`: the per-rank RNG states, as this project's files and as Megatron-LM's rng_state sharded object.
- `torch_dist`: megatron-core's torch_dist format, read safely and written in-process; the only module that
  touches megatron-core's dist_checkpointing strategies.
- `safe_load`: every pickled file of a checkpoint is read here (weights_only, an allow-list unpickler for
  torch's `.metadata`); a refused or damaged file is one CheckpointError line naming it.
- `lock`: one writer per save directory (``{save}/megatron_mile.lock``, taken by training set-up); the run id
  that names a run's temp directories.
- `write_failure`: the one-line message of a save that could not write (full disk: bytes needed and free).
- `collectives`: the agreement collectives that stop every rank with the same reason; `errors`: CheckpointError.
"""

from megatron_mile.checkpointing import async_save
from megatron_mile.checkpointing.compatibility import ARCHITECTURE_FIELDS
from megatron_mile.checkpointing.errors import CheckpointError
from megatron_mile.checkpointing.load import load_checkpoint, load_model_weights, read_training_progress
from megatron_mile.checkpointing.lock import LOCK_FILENAME, SaveDirectoryLock, SaveDirectoryLocked
from megatron_mile.checkpointing.rng import get_rng_state, set_rng_state
from megatron_mile.checkpointing.save import save_checkpoint
from megatron_mile.checkpointing.tracker import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILENAME,
    RNG_DIRNAME,
    TRACKER_FILENAME,
    checkpoint_name,
    read_checkpoint_metadata,
    read_latest_iteration,
    read_saved_config,
)

__all__ = [
    "async_save",
    "ARCHITECTURE_FIELDS",
    "CheckpointError",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK_FILENAME",
    "METADATA_FILENAME",
    "RNG_DIRNAME",
    "SaveDirectoryLock",
    "SaveDirectoryLocked",
    "TRACKER_FILENAME",
    "checkpoint_name",
    "get_rng_state",
    "load_checkpoint",
    "load_model_weights",
    "read_checkpoint_metadata",
    "read_latest_iteration",
    "read_training_progress",
    "read_saved_config",
    "save_checkpoint",
    "set_rng_state",
]
