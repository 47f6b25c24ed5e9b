"""Checkpoints: save, resume and load weights, in Megatron-LM's directory layout and torch_dist format.

Layout of a save directory::

    {dir}/latest_checkpointed_iteration.txt     the newest complete iteration, as a decimal integer
    {dir}/iter_0000100/                         one checkpoint
        metadata.json, common.pt, .metadata,    megatron-core distributed checkpoint (torch_dist) of the
        __<rank>_0.distcp                         model chunks and the optimizer
        mile_checkpoint.json                    plain data: iteration, consumed samples, the run's config,
                                                  LR-scheduler state, parallel layout, vocabulary sizes
        rng/rank_00000.pt ...                   per-rank RNG states (python, numpy, torch CPU/CUDA and
                                                  megatron's model-parallel tracker)

Why torch_dist: every tensor is stored with its global shape and offset (megatron's sharded_state_dict),
so a checkpoint written at one TP/PP/VPP/DP layout loads at another; only the per-rank RNG states stay
with their layout (they are skipped, with a note, when the layout changed), and the distributed
optimizer's state loads at the saved TP/PP/VPP sizes only (any DP size; a clear error otherwise, the
weights still load with load_optimizer=False). The padded vocabulary size must match (it is a multiple
of --make-vocab-size-divisible-by times TP).

Why a synchronous, in-process writer (`_InProcessTorchDistSaveStrategy`) instead of megatron-core's default
torch_dist writer: the default one starts a multiprocessing Manager and forks one writer process per
bucket, which fails inside daemonic worker processes (our test pool) and forks a process that holds gloo
threads. torch's own FileSystemWriter writes the same files from the calling thread.

Safety: a checkpoint directory is data a user hands us. Everything is read with `torch.load(...,
weights_only=True)` (megatron-core's safe globals registered), the distributed checkpoint's pickled
`.metadata` goes through a restricted unpickler that only admits the checkpoint-metadata classes, and
our own metadata is JSON. Saves are atomic: files go to `iter_XXXXXXX.tmp-<token>`, all ranks meet at a
barrier, rank 0 renames the directory and only then replaces the latest-iteration file. A crash mid-save
leaves the previous checkpoint and the latest file untouched; leftover `*.tmp-*` directories are ignored
by loading and removed by the next successful save.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import secrets
import shutil
import traceback
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    TorchDistLoadShardedStrategy,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.safe_globals import register_safe_globals
from torch.distributed import checkpoint as torch_dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron_mile import device
from megatron_mile.training.optimizer import torch_adams, use_fused_torch_adam_on_cpu

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "mile_checkpoint.json"
RNG_DIRNAME = "rng"
FORMAT = "torch_dist"
FORMAT_VERSION = 1

# Model settings that change the parameters' shapes or what they compute: a checkpoint only loads into a
# model that agrees on all of them. Dropout, init std, sequence length (rope) and the vocabulary-padding
# multiple may differ (the padded vocabulary size itself is compared separately).
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "group_query_attention",
    "num_query_groups",
    "normalization",
    "norm_epsilon",
    "swiglu",
    "disable_bias_linear",
    "position_embedding_type",
    "rotary_base",
    "untie_embeddings_and_output_weights",
)

_ITER_DIR_RE = re.compile(r"^iter_(\d{7,})$")
_TMP_DIR_RE = re.compile(r"^iter_\d{7,}\.(tmp|old)-[0-9a-f]+$")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or does not fit the model it is loaded into; the message says why."""


def checkpoint_name(iteration: int) -> str:
    """Directory name of one checkpoint, as Megatron-LM spells it."""
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding it is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a partial one."""
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------------------
# Reading the latest-iteration file and the checkpoint's own metadata (no collectives)
# ----------------------------------------------------------------------------------------------------------


def read_latest_iteration(directory) -> Optional[int]:
    """The iteration in `directory`/latest_checkpointed_iteration.txt; None when the file does not exist.

    Raises ValueError when the file holds anything but one non-negative integer. No collectives.
    """
    tracker = Path(directory) / TRACKER_FILENAME
    if not tracker.is_file():
        return None
    text = tracker.read_text(errors="replace").strip()
    if not re.fullmatch(r"\d+", text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ValueError(
            f"{tracker} should hold one iteration number but holds {shown!r}; it is corrupt. Write the "
            f"number of a complete checkpoint in {directory} (one of its iter_XXXXXXX directories: "
            f"{_list_iterations(Path(directory)) or 'none'}) into it, or delete it to start from scratch"
        )
    return int(text)


def _list_iterations(directory: Path) -> List[int]:
    """Iterations of the complete-looking iter_XXXXXXX directories (temp directories are ignored)."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _ITER_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


def _resolve_checkpoint_dir(load_dir, iteration: Optional[int]) -> Tuple[Optional[Path], Optional[int]]:
    """(iter directory, iteration) to load; (None, None) when `load_dir` holds no checkpoint at all."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        if load_dir.exists():
            raise NotADirectoryError(f"checkpoint path {load_dir} is a file, not a directory: pass the "
                                     f"directory that was given to --save")
        raise FileNotFoundError(
            f"checkpoint directory {load_dir} does not exist: check the --load path, or drop --load to "
            "train from scratch"
        )
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
        if iteration is None:
            existing = _list_iterations(load_dir)
            if existing:
                # Silently training from scratch over existing checkpoints would be the worst outcome.
                raise FileNotFoundError(
                    f"{load_dir} holds checkpoints {[checkpoint_name(i) for i in existing]} but no "
                    f"{TRACKER_FILENAME}: write the iteration to resume from (e.g. {existing[-1]}) into "
                    f"{load_dir / TRACKER_FILENAME}"
                )
            if _ITER_DIR_RE.match(load_dir.name) and (load_dir / METADATA_FILENAME).is_file():
                raise FileNotFoundError(
                    f"{load_dir} is one checkpoint, not a save directory: pass its parent {load_dir.parent}"
                )
            return None, None
    path = load_dir / checkpoint_name(iteration)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist although {load_dir / TRACKER_FILENAME} names iteration "
            f"{iteration}; complete checkpoints in {load_dir}: "
            f"{[checkpoint_name(i) for i in _list_iterations(load_dir)] or 'none'}. Write one of their "
            f"iterations into {TRACKER_FILENAME}"
        )
    if not (path / METADATA_FILENAME).is_file():
        raise FileNotFoundError(
            f"{path} has no {METADATA_FILENAME}: it is incomplete or was not written by megatron_mile. "
            f"Point {TRACKER_FILENAME} at another iteration"
        )
    return path, iteration


def _read_metadata(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / METADATA_FILENAME
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}; the checkpoint is damaged") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a megatron_mile {FORMAT} checkpoint description")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {metadata.get('format_version')}, newer than this code reads "
            f"({FORMAT_VERSION}): update megatron_mile"
        )
    return metadata


def read_checkpoint_metadata(load_dir, iteration: Optional[int] = None) -> dict:
    """The plain-data description of a checkpoint (mile_checkpoint.json), latest unless `iteration`.

    Keys: iteration, consumed_samples, config (the run's config_to_dict), scheduler, layout, vocab, extra.
    No collectives; raises FileNotFoundError when `load_dir` holds no checkpoint.
    """
    path, iteration = _resolve_checkpoint_dir(load_dir, iteration)
    if path is None:
        raise FileNotFoundError(f"{load_dir} holds no checkpoint (no {TRACKER_FILENAME})")
    return _read_metadata(path)


def read_saved_config(load_dir, iteration: Optional[int] = None) -> dict:
    """The run's config dict saved with a checkpoint (config_from_dict rebuilds the RunConfig from it).

    Tools that rebuild the model from a checkpoint alone (export, evaluation) start here. No collectives.
    """
    return read_checkpoint_metadata(load_dir, iteration)["config"]


# ----------------------------------------------------------------------------------------------------------
# Safe reading of the distributed checkpoint
# ----------------------------------------------------------------------------------------------------------

# Globals a torch_dist `.metadata` pickle may reference: the checkpoint-metadata dataclasses, torch's
# size/dtype/layout values and the plain containers pickle builds them with. Nothing that runs code.
_METADATA_PICKLE_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by its name, nothing else
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for a torch_dist `.metadata` file that refuses every global outside a fixed allow-list."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_PICKLE_ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            # dtypes, layouts and memory formats are pickled as `torch.<name>` values.
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a checkpoint's metadata never needs; "
            "refusing to load it (the file may be tampered with)"
        )


class _SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with `.metadata` read by `_MetadataUnpickler` instead of plain pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(MCoreLoadPlanner):
    """megatron's load planner with byte objects read by torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _SafeTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load, with the safe reader and planner above (same on-disk format).

    Collectives: those of torch.distributed.checkpoint.load (a gather and a scatter of the load plans
    over the default group).
    """

    def load(self, sharded_state_dict, checkpoint_dir: Path):
        shape_checked = [
            t for t in nested_values(sharded_state_dict)
            if isinstance(t, ShardedTensor) and not t.allow_shape_mismatch
        ]
        shape_free = {
            t.key: t for t in nested_values(sharded_state_dict)
            if isinstance(t, ShardedTensor) and t.allow_shape_mismatch
        }
        original = sharded_state_dict
        flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, True)
        torch_dcp.load(
            pyt_state_dict,
            storage_reader=_SafeFileSystemReader(checkpoint_dir),
            planner=_SafeLoadPlanner(
                shapes_validation_sharded_tensors=shape_checked,
                allow_shape_mismatch_sharded_tensors=shape_free,
            ),
        )
        state_dict = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        state_dict = _replace_sharded_keys_with_state_dict_keys(state_dict, flat_mapping, rename_mapping)
        _restore_dict_types(state_dict, original)
        return state_dict

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata=None):
        if metadata is None:
            metadata = _SafeFileSystemReader(checkpoint_dir).read_metadata()
        return super().load_tensors_metadata(checkpoint_dir, metadata)


class _SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """common.pt (and object shards, were any stored as files) read with weights_only=True explicitly,
    whatever torch's default or the TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD environment variable says."""

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / "common.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint {checkpoint_dir} is incomplete")
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise NotImplementedError("megatron_mile checkpoints keep no per-object files")


class _InProcessTorchDistSaveStrategy(SaveShardedStrategy):
    """Writes megatron-core's torch_dist format with torch's FileSystemWriter, in the calling thread.

    Collectives: those of torch.distributed.checkpoint.save (gather of the save plans to rank 0, scatter
    of the global plan, gather of the write results) over the default group.
    """

    def __init__(self):
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        # Only the main replica of each shard is written (as megatron's own strategy does).
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        torch_dcp.save(
            pyt_state_dict,
            storage_writer=FileSystemWriter(checkpoint_dir, single_file_per_rank=True, sync_files=True, thread_count=1),
            planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False),
        )

    def can_handle_sharded_objects(self) -> bool:
        return True


# ----------------------------------------------------------------------------------------------------------
# State gathering
# ----------------------------------------------------------------------------------------------------------

# How the distributed optimizer lays out its state in a checkpoint: dp_reshardable (Megatron-LM's default,
# one tensor per gradient bucket; the DP size may change, TP/PP may not). megatron-core 0.16.1's
# layout-independent formats fail with torch's Adam (no Apex/Transformer Engine): 'fully_reshardable'
# loses the per-parameter 'step' key on load, 'fully_sharded_model_space' cannot describe the 0-d step.
_SHARDED_STATE_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _model_sharded_state_dict(model: list) -> dict:
    """{'model0': ..., 'model1': ...}: one entry per chunk; tensor keys are global layer numbers, so the
    chunk count (virtual pipeline) may change between save and load."""
    return {
        f"model{index}": _unwrap(chunk).sharded_state_dict(metadata=dict(_SHARDED_STATE_METADATA))
        for index, chunk in enumerate(model)
    }


def _layout() -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def _vocab(model: list) -> dict:
    chunk = _unwrap(model[0])
    return {"padded": int(getattr(chunk, "vocab_size", -1)), "real": int(getattr(chunk, "real_vocab_size", -1))}


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


def _check_finite(model: list) -> None:
    """Raise CheckpointError on every rank when any rank holds a non-finite parameter.

    Collectives: one all-reduce (SUM) of a world-sized int tensor over the default group.
    """
    bad = [
        f"model{index}.{name}"
        for index, chunk in enumerate(model)
        for name, param in _unwrap(chunk).named_parameters()
        if not bool(torch.isfinite(param.detach()).all())
    ]
    world = dist.get_world_size() if dist.is_initialized() else 1
    flags = torch.zeros(world, dtype=torch.int32, device=device.compute_device())
    flags[_rank()] = len(bad)
    if dist.is_initialized():
        dist.all_reduce(flags)
    bad_ranks = [r for r in range(world) if int(flags[r]) > 0]
    if bad_ranks:
        here = f"; on this rank: {bad[:8]}{' ...' if len(bad) > 8 else ''}" if bad else ""
        raise CheckpointError(
            f"refusing to save: non-finite (NaN/inf) parameters on rank(s) {bad_ranks}{here}. Nothing was "
            "written; resume from the last good checkpoint with a lower --lr"
        )


# ----------------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------------


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
    _check_finite(model)
    rank = _rank()

    # One temp name for all ranks: rank 0 draws it, everyone receives it.
    token = [secrets.token_hex(6) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    final = save_dir / checkpoint_name(iteration)
    tmp = save_dir / f"{final.name}.tmp-{token[0]}"
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier()

    sharded = _model_sharded_state_dict(model)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=dict(_SHARDED_STATE_METADATA))
    dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_InProcessTorchDistSaveStrategy())

    # Made after the distributed save, which expects to start in an empty directory.
    (tmp / RNG_DIRNAME).mkdir(exist_ok=True)
    torch.save(get_rng_state(), tmp / RNG_DIRNAME / f"rank_{rank:05d}.pt")
    if rank == 0:
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "iteration": int(iteration),
            "consumed_samples": int(consumed_samples),
            "config": config_dict,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "has_optimizer": optimizer is not None,
            "optimizer_format": _optimizer_format(optimizer),
            "layout": _layout(),
            "vocab": _vocab(model),
            "extra": extra or {},
        }
        # Written last among rank 0's files: a directory with it has all of rank 0's parts.
        _write_text_atomic(tmp / METADATA_FILENAME, json.dumps(metadata, indent=1, sort_keys=True))
    _before_commit(tmp)
    _barrier()  # every rank's files are in tmp

    if rank == 0:
        _commit(save_dir, tmp, final, iteration)
    _barrier()  # nobody returns (or exits) before the checkpoint is visible
    if rank == 0:
        print(f" saved checkpoint at iteration {iteration:7d} to {final}", flush=True)
    return str(final)


def _before_commit(tmp: Path) -> None:
    """Hook between writing and committing a save; tests replace it to simulate a crash there."""


def _commit(save_dir: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Rank 0: move the finished temp directory into place, then point the tracker at it."""
    _fsync_dir(tmp)
    old = None
    if final.exists():
        # Re-saving an iteration: move the old copy aside first (a directory rename cannot replace a
        # non-empty directory). Between these two renames a crash leaves iter_X missing and the tracker
        # naming it: loading then stops with a clear error; the old copy is still in the .old- directory.
        old = final.with_name(f"{final.name}.old-{secrets.token_hex(6)}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(save_dir)
    _write_text_atomic(save_dir / TRACKER_FILENAME, f"{iteration}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of saves that crashed before their rename are never loaded; clear them.
    for entry in save_dir.iterdir():
        if _TMP_DIR_RE.match(entry.name) and entry != tmp:
            shutil.rmtree(entry, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------


def _check_model_config(saved: dict, current: dict, checkpoint_dir: Path) -> None:
    saved_model, current_model = saved.get("model", {}), current.get("model", {})
    differing = [
        f"{name}: checkpoint {saved_model.get(name)!r}, this run {current_model.get(name)!r}"
        for name in ARCHITECTURE_FIELDS
        if saved_model.get(name) != current_model.get(name)
    ]
    # Learned position embeddings have one row per position: their count must match too.
    if current_model.get("position_embedding_type") == "learned_absolute" and \
            saved_model.get("max_position_embeddings") != current_model.get("max_position_embeddings"):
        differing.append(
            f"max_position_embeddings: checkpoint {saved_model.get('max_position_embeddings')!r}, this run "
            f"{current_model.get('max_position_embeddings')!r}"
        )
    if differing:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} was saved from a different model:\n  - "
            + "\n  - ".join(differing)
            + "\nUse the checkpoint's model flags (megatron_mile.training.checkpointing.read_saved_config "
            "shows them) or load another checkpoint"
        )


def _check_vocab(saved: dict, model: list, checkpoint_dir: Path) -> None:
    current = _vocab(model)
    saved_padded, saved_real = saved.get("padded"), saved.get("real")
    if saved_real != current["real"]:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} was saved with a {saved_real}-token vocabulary, this run's "
            f"tokenizer has {current['real']}: use the tokenizer the checkpoint was trained with"
        )
    if saved_padded != current["padded"]:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} pads the vocabulary to {saved_padded} rows, this run to "
            f"{current['padded']} (padding is a multiple of --make-vocab-size-divisible-by times the TP "
            f"size): choose --make-vocab-size-divisible-by so that {current['real']} tokens pad to "
            f"{saved_padded} at this TP size"
        )


def _optimizer_format(optimizer) -> Optional[str]:
    """'distributed/<sharding type>' for megatron's distributed optimizer, 'standard' otherwise."""
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: PLC0415

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if any(isinstance(sub, DistributedOptimizer) for sub in subs):
        return f"distributed/{_SHARDED_STATE_METADATA['distrib_optim_sharding_type']}"
    return "standard"


def _check_optimizer_compatible(metadata: dict, optimizer, checkpoint_dir: Path) -> None:
    """The optimizer state formats must match; the distributed optimizer's (dp_reshardable: one tensor
    per gradient bucket) loads only at the saved TP/PP/VPP layout, the DP size may change."""
    saved, current = metadata.get("optimizer_format"), _optimizer_format(optimizer)
    if saved != current:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} holds {saved} optimizer state, this run uses the {current} "
            "optimizer: match --use-distributed-optimizer to the saved run, or load the weights only "
            "(load_optimizer=False) and start the optimizer afresh"
        )
    if current.startswith("distributed/"):
        keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size")
        saved_layout = {k: metadata.get("layout", {}).get(k) for k in keys}
        current_layout = {k: _layout()[k] for k in keys}
        if saved_layout != current_layout:
            raise CheckpointError(
                f"the checkpoint {checkpoint_dir} holds distributed-optimizer state saved at "
                f"{_describe_layout(saved_layout)}; this run uses {_describe_layout(current_layout)}. That "
                "state only loads at the same TP/PP/VPP sizes (the data-parallel size may differ): resume "
                "at the saved sizes, or load the weights only (load_optimizer=False)"
            )


def _describe_layout(layout: dict) -> str:
    return (f"TP={layout['tensor_model_parallel_size']}, PP={layout['pipeline_model_parallel_size']}, "
            f"VPP={layout['virtual_pipeline_model_parallel_size'] or 1}")


def _init_empty_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer zero Adam state with a step counter before loading into it.

    Why: megatron-core's DistributedOptimizer.sharded_state_dict(is_loading=True) first calls its own
    state_dict(), which (without Apex/Transformer Engine, i.e. with torch's Adam) asserts that every
    parameter's state holds one common 'step'; an optimizer that has not stepped yet holds none. The
    values put here are placeholders that the checkpoint overwrites. No collectives.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: PLC0415

    for sub, inner in torch_adams(optimizer):
        if not isinstance(sub, DistributedOptimizer):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if all(len(inner.state[p]) > 0 for p in params):
            continue
        if sub.init_state_fn is not None:
            sub.init_state_fn(inner, sub.config)
        for p in params:
            inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


def _restore_distributed_optimizer_step(optimizer) -> None:
    """Put the loaded Adam step counter back into every parameter's state (distributed optimizer).

    Why: with torch's Adam, megatron-core's DistributedOptimizer keeps the step in its param groups in
    the checkpoint and sets it into each parameter's state on load, but its per-bucket state copy that
    follows overwrites 'step' with the placeholder of the freshly initialised state; the bias correction
    of the next update would then restart. The param groups keep the loaded value. No collectives.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: PLC0415

    for sub, inner in torch_adams(optimizer):
        if not isinstance(sub, DistributedOptimizer):
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                if "step" in inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _load_distributed(checkpoint_dir: Path, sharded: dict) -> dict:
    """Collectives: those of torch.distributed.checkpoint.load and megatron's load validation."""
    register_safe_globals()
    try:
        return dist_checkpointing.load(
            sharded,
            str(checkpoint_dir),
            sharded_strategy=_SafeTorchDistLoadStrategy(),
            common_strategy=_SafeCommonLoadStrategy(),
        )
    except (KeyError, CheckpointingException, torch_dcp.api.CheckpointException) as error:
        # Missing keys and shape mismatches surface as KeyError / megatron's CheckpointingException;
        # anything torch's reader or planner raised (e.g. refused metadata) is wrapped in torch's
        # CheckpointException, which derives from BaseException: turn both into a clear error.
        raise CheckpointError(f"cannot load {checkpoint_dir} into this model: {_describe_load_error(error)}") from error


def _describe_load_error(error: BaseException) -> str:
    """One line per failing rank ("rank 0: FileNotFoundError: ...") instead of torch's stack traces."""
    failures = getattr(error, "failures", None)
    if isinstance(error, torch_dcp.api.CheckpointException) and failures:
        return "; ".join(
            f"rank {rank}: " + "".join(traceback.format_exception_only(type(exc), exc)).strip()
            for rank, (exc, _) in sorted(failures.items())
        )
    return str(error)


def _load_chunks(model: list, loaded: dict, strict: bool = True) -> None:
    for index, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded[f"model{index}"], strict=strict)


def load_checkpoint(load_dir, model: list, optimizer, scheduler, config_dict: dict, load_optimizer: bool = True,
                    load_rng: bool = True, iteration: Optional[int] = None) -> Tuple[int, int]:
    """Load the latest checkpoint (or `iteration`) of `load_dir` into model, optimizer and scheduler.

    Returns (iteration, consumed_samples); (0, 0) with a printed note when `load_dir` has no checkpoint.
    Must be called on every rank. The model may use another TP/PP/VPP/DP layout than the saved one; RNG
    states are restored only at the saved layout (a note is printed otherwise). Raises FileNotFoundError /
    ValueError (CheckpointError) naming the path and the fix for a missing directory or iteration, a
    corrupt latest file, or a model whose architecture or vocabulary differs from the checkpoint's.

    Collectives: those of megatron's dist_checkpointing.load (all-gathers of shard metadata for
    validation; torch.distributed.checkpoint.load's plan gather/scatter); the distributed optimizer's scatter
    of its state when it is used; one final barrier.
    """
    checkpoint_dir, iteration = _resolve_checkpoint_dir(load_dir, iteration)
    if checkpoint_dir is None:
        if _rank() == 0:
            print(f" no checkpoint in {load_dir} ({TRACKER_FILENAME} not found): training from scratch",
                  flush=True)
        return 0, 0
    metadata = _read_metadata(checkpoint_dir)
    _check_model_config(metadata.get("config", {}), config_dict, checkpoint_dir)
    _check_vocab(metadata.get("vocab", {}), model, checkpoint_dir)
    load_optimizer = load_optimizer and optimizer is not None
    if load_optimizer and not metadata.get("has_optimizer", False):
        raise CheckpointError(f"{checkpoint_dir} holds no optimizer state: load it with load_optimizer=False")

    if load_optimizer:
        _check_optimizer_compatible(metadata, optimizer, checkpoint_dir)

    sharded = _model_sharded_state_dict(model)
    if load_optimizer:
        _init_empty_distributed_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=dict(_SHARDED_STATE_METADATA)
        )
    loaded = _load_distributed(checkpoint_dir, sharded)
    _load_chunks(model, loaded)
    if load_optimizer:
        # megatron's distributed-optimizer load copies into its fp32 main parameters (leaves that
        # require grad) outside no_grad on some paths; the copy is a state restore, not a computation.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_distributed_optimizer_step(optimizer)
        use_fused_torch_adam_on_cpu(optimizer)  # the loaded param groups carry the saving run's kernel flags
        if scheduler is not None and metadata.get("scheduler") is not None:
            scheduler.load_state_dict(metadata["scheduler"])

    if load_rng:
        _load_rng(checkpoint_dir, metadata)
    _barrier()
    if _rank() == 0:
        print(f" loaded checkpoint {checkpoint_dir} (iteration {iteration}, "
              f"{metadata['consumed_samples']} samples consumed)", flush=True)
    return int(metadata["iteration"]), int(metadata["consumed_samples"])


def _load_rng(checkpoint_dir: Path, metadata: dict) -> None:
    saved_layout = metadata.get("layout", {})
    if saved_layout != _layout():
        # Per-rank streams do not map between layouts; the run continues with its freshly seeded ones.
        if _rank() == 0:
            print(f" note: {checkpoint_dir} was saved at layout {saved_layout}, this run uses {_layout()}; "
                  "RNG states are not restored (dropout masks will differ from an uninterrupted run)",
                  flush=True)
        return
    path = checkpoint_dir / RNG_DIRNAME / f"rank_{_rank():05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete; load with load_rng=False "
                                "to continue with fresh RNG states")
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))


def load_model_weights(load_dir, model: list, iteration: Optional[int] = None,
                       config_dict: Optional[dict] = None) -> int:
    """Load only the model weights (latest, or `iteration`) into `model`; returns the iteration.

    For evaluation and export tools: no optimizer, scheduler or RNG state is touched. With `config_dict`
    the architecture is checked as in load_checkpoint. Must be called on every rank of the model's layout.

    Collectives: those of megatron's dist_checkpointing.load; one barrier.
    """
    checkpoint_dir, iteration = _resolve_checkpoint_dir(load_dir, iteration)
    if checkpoint_dir is None:
        raise FileNotFoundError(f"{load_dir} holds no checkpoint (no {TRACKER_FILENAME})")
    metadata = _read_metadata(checkpoint_dir)
    if config_dict is not None:
        _check_model_config(metadata.get("config", {}), config_dict, checkpoint_dir)
    _check_vocab(metadata.get("vocab", {}), model, checkpoint_dir)
    loaded = _load_distributed(checkpoint_dir, _model_sharded_state_dict(model))
    _load_chunks(model, loaded)
    _barrier()
    return int(iteration)
