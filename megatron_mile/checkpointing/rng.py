"""Per-rank random-number-generator states in a checkpoint: python, numpy, torch CPU/CUDA and megatron's
model-parallel tracker, so that a resumed run draws the same dropout masks as an uninterrupted one.

Stored as ``{checkpoint}/rng/rank_<global rank>.pt``, tensors and plain data only (loadable with
weights_only=True). The streams belong to their rank in its layout; loading skips them when the layout
changed (megatron_mile.checkpointing.load).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

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
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and device.gpu_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


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
