"""Per-rank random-number-generator states in a checkpoint: python, numpy, torch CPU/CUDA and megatron's
model-parallel tracker, so that a resumed run draws the same dropout masks as an uninterrupted one.

Two forms, both written by every save:

- this project's ``{checkpoint}/rng/rank_<global rank>.pt``, one per global rank, tensors and plain data only
  (loadable with weights_only=True); the streams belong to their rank in its layout, and loading skips them
  when the layout changed (megatron_mile.checkpointing.load);
- Megatron-LM's ``rng_state`` sharded object: ``ShardedObject('rng_state', [state], (PP size, TP size),
  (PP rank, TP rank), replica_id=DP rank)`` with ``state = {random_rng_state, np_rng_state, torch_rng_state,
  cuda_rng_state, rng_tracker_states}`` (numpy's state as numpy returns it; ``cuda_rng_state`` None on CPU).
  Only data-parallel rank 0's state is stored per (PP, TP) rank: the other DP ranks draw the same streams
  (the seeds depend on the PP and TP ranks only). With Megatron-LM's --data-parallel-random-init the list
  holds one state per DP rank instead. Megatron-LM's loader reads it back at the same TP/PP sizes, and so
  does this project's for a checkpoint Megatron-LM wrote.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_mile import device
from megatron_mile.checkpointing import collectives, safe_load
from megatron_mile.checkpointing.errors import CheckpointError
from megatron_mile.checkpointing.tracker import RNG_DIRNAME


def rng_state_path(checkpoint_dir: Path) -> Path:
    """This rank's RNG file in `checkpoint_dir`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Path(checkpoint_dir) / RNG_DIRNAME / f"rank_{rank:05d}.pt"


def get_rng_state() -> dict:
    """This rank's RNG states as tensors and plain data (loadable with weights_only=True). No collectives."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's key array is stored as a tensor so that loading needs no numpy globals.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if device.gpu_available() else None,
        "tracker": {name: s.clone() for name, s in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state returned. No collectives."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    _restore(state["python"], (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached), state["torch_cpu"],
             state.get("cuda"), state["tracker"])


def _restore(python, numpy_state, torch_cpu, cuda, tracker) -> None:
    random.setstate(_to_tuple(python))
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_cpu)
    # On CPU there is no CUDA generator: megatron's tracker streams live in the CPU generator (cpu_compat).
    if cuda is not None and device.gpu_available():
        torch.cuda.set_rng_state(cuda)
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def _to_tuple(value):
    # random.setstate wants tuples all the way down; keep them as saved, but accept lists too.
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuple(v) for v in value)
    return value


def save_rng_state(checkpoint_dir: Path) -> None:
    """Write this rank's RNG states into `checkpoint_dir`/rng/. No collectives.

    Written through a Python file object, so that a full disk raises OSError(ENOSPC) (torch's own file
    writer reports it as an unrelated "unexpected pos" error).
    """
    path = rng_state_path(checkpoint_dir)
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as handle:
        torch.save(get_rng_state(), handle)


def load_rng_state(checkpoint_dir: Path) -> None:
    """Restore this rank's RNG states from `checkpoint_dir`, on every rank or on none.

    Raises CheckpointError on every rank, with the first failing rank's one-line reason, when any rank's
    file is missing, refused (safe_load) or damaged. Collectives: one all_gather_object.
    """
    path = rng_state_path(checkpoint_dir)
    state, failure = None, None
    if not path.is_file():
        failure = (f"{path} is missing: the checkpoint is incomplete; load with load_rng=False to continue with "
                   "fresh RNG states")
    else:
        try:
            state = safe_load.load_weights_only(path)
        except CheckpointError as error:
            failure = str(error)
    # Agree before restoring: a rank that stopped alone would leave its peers blocked in the next collective.
    failure = collectives.first_failure(failure)
    if failure is not None:
        raise CheckpointError(failure)
    set_rng_state(state)


# ----------------------------------------------------------------------------------------------------------
# Megatron-LM's rng_state sharded object
# ----------------------------------------------------------------------------------------------------------

RNG_STATE_KEY = "rng_state"


def megatron_lm_rng_state() -> dict:
    """This rank's RNG states under Megatron-LM's names (its get_rng_state's dict). No collectives."""
    state = get_rng_state()
    return {
        "random_rng_state": state["python"],
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": state["torch_cpu"],
        "cuda_rng_state": state["cuda"],
        "rng_tracker_states": state["tracker"],
    }


def rng_state_object(states: Optional[list] = None) -> ShardedObject:
    """Megatron-LM's ``rng_state`` ShardedObject for this rank (module docstring) holding `states` (default:
    [this rank's megatron_lm_rng_state()], also the placeholder a load replaces with the stored list). Needs
    megatron's parallel state. No collectives."""
    return ShardedObject(
        RNG_STATE_KEY,
        [megatron_lm_rng_state()] if states is None else states,
        (parallel_state.get_pipeline_model_parallel_world_size(),
         parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def set_megatron_lm_rng_state(state: dict) -> None:
    """Restore one of Megatron-LM's rng_state entries (megatron_lm_rng_state's keys); its CUDA state only
    where a GPU is used. No collectives."""
    _restore(state["random_rng_state"], state["np_rng_state"], state["torch_rng_state"], state.get("cuda_rng_state"),
             state["rng_tracker_states"])


def restore_megatron_lm_rng_states(states: list, data_parallel_random_init: bool) -> Optional[str]:
    """Restore this rank's entry of a loaded rng_state list, as Megatron-LM picks it: entry 0, or with
    --data-parallel-random-init (`data_parallel_random_init`) this rank's DP entry. Returns None, or the note
    that nothing was restored (a per-DP-rank list of another DP size). No collectives."""
    if not data_parallel_random_init or len(states) == 1:
        set_megatron_lm_rng_state(states[0])
        return None
    dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    if len(states) != dp_size:
        return (f"its RNG states are per data-parallel rank (--data-parallel-random-init) for DP {len(states)}, this "
                f"run uses DP {dp_size}: the run continues with freshly seeded ones")
    set_megatron_lm_rng_state(states[parallel_state.get_data_parallel_rank(with_context_parallel=True)])
    return None
