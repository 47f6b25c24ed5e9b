"""megatron-core's torch_dist checkpoint format, read safely and written in-process.

The one module that touches megatron-core's dist_checkpointing strategies and torch.distributed.checkpoint.
Where megatron-core releases differ (strategy base classes, how ``common.pt`` is read on load), the names come
from megatron_mile.megatron_core_api.checkpoint.

What is stored: megatron's sharded state dict of the model chunks (and optionally the optimizer). Every
tensor is kept with its global shape and offset, so a checkpoint written at one TP/PP/VPP/DP layout loads
at another. Files: ``.metadata`` (torch's pickled checkpoint metadata), ``__<rank>_0.distcp`` (tensor
data), ``common.pt`` (the non-sharded items), ``metadata.json`` (megatron's format tag). megatron-core
0.17+'s own writer keeps the non-sharded items as a ``common_state`` object inside the ``.distcp`` files
instead of ``common.pt``; `read_common_state` reads either, so Megatron-LM checkpoints of both ages load.

Why an in-process writer (`_InProcessTorchDistSaveStrategy`) instead of megatron-core's default torch_dist
writer: the default starts a multiprocessing Manager and forks one writer process per bucket, which fails
inside daemonic worker processes (our test pool) and forks a process that holds gloo threads. torch's own
FileSystemWriter writes the same files from the calling thread.

Safety: a checkpoint directory is data a user hands us. Every pickled file is read through
megatron_mile.checkpointing.safe_load (tensors and common.pt with weights_only=True and safe_load's explicit
allow-list; ``.metadata`` by an allow-list unpickler), and a refused or damaged file stops the load
with one line naming it.
"""

from __future__ import annotations

import contextlib
import io
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, CheckpointingException, save_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as torch_dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import MetadataIndex, StorageMeta

from megatron_mile.checkpointing import safe_load
from megatron_mile.checkpointing.errors import CheckpointError
from megatron_mile.megatron_core_api.checkpoint import TorchDistLoadStrategy, TorchDistSaveStrategy, load_torch_dist

# How the distributed optimizer lays out its state in a checkpoint: dp_reshardable (Megatron-LM's default,
# one tensor per gradient bucket; the DP size may change, TP/PP may not). megatron-core 0.16.1's
# layout-independent formats fail with torch's Adam (no Apex/Transformer Engine): 'fully_reshardable'
# loses the per-parameter 'step' key on load, 'fully_sharded_model_space' cannot describe the 0-d step.
DISTRIBUTED_OPTIMIZER_SHARDING = "dp_reshardable"
_SHARDED_STATE_METADATA = {
    "distrib_optim_sharding_type": DISTRIBUTED_OPTIMIZER_SHARDING,
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}

# What a failed load raises: missing keys and shape mismatches surface as KeyError / megatron's
# CheckpointingException; anything torch's reader or planner raised (e.g. refused metadata) is wrapped
# in torch's CheckpointException, which derives from BaseException.
LOAD_ERRORS = (KeyError, CheckpointingException, torch_dcp.api.CheckpointException)

# The files of the format (megatron-core's and torch's names), and megatron's format tag.
COMMON_FILENAME = "common.pt"
# Where megatron-core 0.17+'s dist_checkpointing.save keeps the common state instead: a ShardedObject named
# "common_state" of global shape (1,) at offset (0,), stored under its unique key.
COMMON_STATE_OBJECT = "common_state"
COMMON_STATE_KEY = f"{COMMON_STATE_OBJECT}/shard_0_1"
_FORMAT_BACKEND, _FORMAT_VERSION = "torch_dist", 1
METADATA_FILENAME = ".metadata"


def content_metadata() -> dict:
    """How this project lays out its sharded keys, as megatron-core's ``content_metadata`` (a copy)."""
    return dict(_SHARDED_STATE_METADATA)


def unwrap_model(module):
    """The megatron model inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def sharded_state_dict(model: list, optimizer=None, is_loading: bool = False) -> dict:
    """{'model0': ..., 'model1': ..., ['optimizer': ...]}: megatron's sharded state dict of a run.

    One entry per model chunk; tensor keys are global layer numbers, so the chunk count (virtual
    pipeline) may change between save and load. With `optimizer`, its sharded state (the distributed
    optimizer's in the dp_reshardable layout). With `is_loading`, the optimizer describes what to load
    into. Collectives: the distributed optimizer's gather of its state over the DP group when saving.
    """
    state = {
        f"model{index}": unwrap_model(chunk).sharded_state_dict(metadata=dict(_SHARDED_STATE_METADATA))
        for index, chunk in enumerate(model)
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=dict(_SHARDED_STATE_METADATA)
        )
    return state


def prepare_save(state: dict) -> Tuple[dict, dict]:
    """(sharded part, common part) of `state` (from sharded_state_dict), as megatron's save splits it.

    Collectives: megatron's save validation (all-gathers of shard metadata) over the default group.
    """
    return save_preprocess(state, validate_access_integrity=True)


def write_common(common: dict, checkpoint_dir: Path) -> None:
    """Rank 0: the common part into ``common.pt``. No collectives.

    Written through a Python file object: a full disk then raises OSError(ENOSPC), where torch's own file
    writer reports an unrelated "unexpected pos" error.
    """
    with open(Path(checkpoint_dir) / COMMON_FILENAME, "wb") as handle:
        torch.save(common, handle)


def write_sharded(sharded: dict, checkpoint_dir: Path) -> None:
    """Every rank: its tensors of the sharded part into ``__<rank>_0.distcp``; rank 0 also ``.metadata``.

    A failed write on any rank raises torch's CheckpointException on every rank. Collectives: those of
    torch.distributed.checkpoint.save (gather of the save plans to rank 0, scatter of the global plan,
    gather of the write results) over the default group.
    """
    _InProcessTorchDistSaveStrategy().save(sharded, Path(checkpoint_dir))


def write_sharded_async(sharded: dict, checkpoint_dir: Path, process_group) -> Future:
    """write_sharded in the background: this rank's tensors are copied to CPU memory now (the caller may
    change them as soon as this returns), then written by a thread (torch.distributed.checkpoint.async_save).

    The future completes when this rank's files are written (rank 0: also ``.metadata``); its result()
    raises the write's error. Collectives: those of torch.distributed.checkpoint.save, issued from the
    background thread over `process_group`, which must be a CPU (gloo) group of all ranks that nothing else
    uses, so that they never interleave with the training's collectives.
    """
    for tensor in nested_values(sharded):
        if isinstance(tensor, ShardedTensor) and tensor.data is not None:
            # Why copy here rather than let torch stage: torch's stager leaves CPU tensors uncopied (the next
            # optimizer step updates them in place while the thread writes) and cannot copy the wrapper
            # tensors megatron's state dict becomes; so the shards are copied first, and staged as they are.
            tensor.data = tensor.data.detach().to("cpu", copy=True)
    return torch_dcp.async_save(_torch_state_dict(sharded), storage_writer=_writer(checkpoint_dir),
                                planner=_planner(), process_group=process_group, async_stager=_AlreadyStaged())


class _AlreadyStaged(AsyncStager):
    """torch's async-save staging step for a state dict whose tensors are private CPU copies already."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _torch_state_dict(sharded: dict) -> dict:
    """megatron's sharded state dict as torch.distributed.checkpoint takes it; only the main replica of each
    shard is written (as megatron's own strategy does)."""
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    return mcore_to_pyt_state_dict(flat, False)


def _writer(checkpoint_dir: Path) -> FileSystemWriter:
    return FileSystemWriter(checkpoint_dir, single_file_per_rank=True, sync_files=True, thread_count=1)


def _planner() -> MCoreSavePlanner:
    return MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)


def write_format_tag(checkpoint_dir: Path) -> None:
    """Rank 0: megatron's ``metadata.json`` (backend and version), which its loader checks. No collectives."""
    save_config(CheckpointingConfig(_FORMAT_BACKEND, _FORMAT_VERSION), str(checkpoint_dir))


def main_replica_bytes(sharded: dict) -> int:
    """Bytes of this rank's tensors that a save writes (main replicas only). No collectives."""
    return sum(
        t.data.numel() * t.data.element_size()
        for t in nested_values(sharded)
        if isinstance(t, ShardedTensor) and t.data is not None and is_main_replica(t.replica_id)
    )


def load_sharded(state: dict, checkpoint_dir: Path) -> dict:
    """Load `checkpoint_dir` into the shapes `state` (from sharded_state_dict) describes; returns the
    loaded state dict (same keys). Raises one of LOAD_ERRORS when the checkpoint does not fit, and
    CheckpointError (safe_load's one line naming the file) when a file is refused or damaged.

    Collectives: those of torch.distributed.checkpoint.load (plan gather/scatter) and megatron's load
    validation (all-gathers of shard metadata), over the default group.
    """
    # Read first on every rank: a refused `.metadata` stops all of them here with the same one line, instead
    # of inside torch's loader, which logs the failure with a traceback and reports another error.
    safe_load.load_checkpoint_metadata(Path(checkpoint_dir) / METADATA_FILENAME)
    return load_torch_dist(state, Path(checkpoint_dir), _SafeTorchDistLoadStrategy(), read_common_state)


def stored_keys(checkpoint_dir: Path) -> set:
    """The sharded keys a checkpoint stores (tensor keys such as ``optimizer.state.exp_avg.<param>``, object
    shards as ``<key>/shard_<offsets>_<shape>``), from its ``.metadata`` read safely. Raises CheckpointError
    naming the file when it is missing, refused or damaged. No collectives."""
    metadata = safe_load.load_checkpoint_metadata(Path(checkpoint_dir) / METADATA_FILENAME)
    return set(metadata.state_dict_metadata)


def refused_file(error: BaseException) -> Optional[CheckpointError]:
    """The CheckpointError of a file safe_load refused inside a failed load (on any rank), else None."""
    if isinstance(error, CheckpointError):
        return error
    for exc, _ in (getattr(error, "failures", None) or {}).values():
        if isinstance(exc, CheckpointError):
            return exc
    return None


def describe_load_error(error: BaseException) -> str:
    """One line ("rank 0: KeyError: ...; rank 1: ...") instead of torch's per-rank stack traces."""
    failures = getattr(error, "failures", None)
    if isinstance(error, torch_dcp.api.CheckpointException) and failures:
        return "; ".join(f"rank {rank}: {safe_load.safe_reason(exc)}" for rank, (exc, _) in sorted(failures.items()))
    return " ".join(str(error).split())


# ----------------------------------------------------------------------------------------------------------
# Safe reading
# ----------------------------------------------------------------------------------------------------------

class _RecordingFileSystem(FileSystem):
    """torch's FileSystem that remembers the last file it opened, so that a failed read can name it."""

    last_opened: Optional[Path] = None

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        self.last_opened = Path(path)
        with super().create_stream(path, mode) as stream:
            yield stream


class _SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with `.metadata` read by safe_load's MetadataUnpickler instead of plain pickle,
    and any failure to read a tensor file raised as safe_load's one-line CheckpointError naming it."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.fs = _RecordingFileSystem()

    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata = safe_load.load_checkpoint_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except Exception as error:  # noqa: BLE001 - an untrusted file failed to parse, whatever the cause
            raise safe_load.unreadable_file_error(self.fs.last_opened or self.path, error) from None


class _SafeLoadPlanner(MCoreLoadPlanner):
    """megatron's load planner with byte objects read by torch.load(weights_only=True), admitting beyond
    tensors and plain data the classes `allowed` (default: those of the common state and of sharded objects)."""

    def __init__(self, *args, allowed=safe_load.COMMON_STATE_ALLOWED + safe_load.OBJECT_SHARD_ALLOWED, **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed = allowed

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # Runs inside _SafeFileSystemReader.read_data, which names the file when this fails.
        with safe_load.only_allowed_globals(self.allowed):
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _SafeTorchDistLoadStrategy(TorchDistLoadStrategy):
    """megatron-core's torch_dist load, with the safe reader and planner above (same on-disk format).

    Collectives: those of torch.distributed.checkpoint.load (a gather and a scatter of the load plans
    over the default group).
    """

    def load(self, sharded_state_dict, checkpoint_dir: Path, *_release_specific):
        # (0.19's load also takes an async_strategy name, which names megatron's own reader: unused here.)
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


def read_common_state(checkpoint_dir: Path) -> dict:
    """The non-sharded ("common") state dict of a torch_dist checkpoint, from whichever of the format's two
    places holds it: ``common.pt`` (this project's writer; megatron-core <= 0.16's ``dist_checkpointing.save``)
    or, without that file, the ``common_state`` sharded object inside the ``.distcp`` files (megatron-core
    0.17+'s ``dist_checkpointing.save``, so Megatron-LM on a current megatron-core). Which one is a property
    of the files, not of the installed megatron-core: both releases read both.

    Either is read with weights_only=True and safe_load's allow-list (COMMON_STATE_ALLOWED), whatever torch's
    default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says. Either place is held to safe_load.MAX_PICKLED_FILE_BYTES
    before anything is read (common.pt's size on disk, the object's in `.metadata`, whose file must lie in the
    checkpoint directory). Raises CheckpointError naming the file when the common state is missing, too large,
    refused or damaged. No collectives (each calling rank reads the files itself).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / COMMON_FILENAME).is_file():
        return safe_load.load_weights_only(checkpoint_dir / COMMON_FILENAME)
    metadata_path = checkpoint_dir / METADATA_FILENAME
    metadata = safe_load.load_checkpoint_metadata(metadata_path)
    if COMMON_STATE_KEY not in metadata.state_dict_metadata:
        raise CheckpointError(f"{checkpoint_dir} holds neither {COMMON_FILENAME} nor a '{COMMON_STATE_OBJECT}' object "
                              f"in {METADATA_FILENAME}: it is not a complete torch_dist checkpoint of megatron-core")
    stored = metadata.storage_data.get(MetadataIndex(COMMON_STATE_KEY)) if metadata.storage_data else None
    length, file_name = getattr(stored, "length", None), getattr(stored, "relative_path", None)
    max_bytes = safe_load.MAX_PICKLED_FILE_BYTES
    in_directory = isinstance(file_name, str) and file_name not in ("", ".", "..") and Path(file_name).name == file_name
    if not (in_directory and isinstance(length, int) and 0 < length <= max_bytes):
        raise CheckpointError(
            f"{metadata_path} places '{COMMON_STATE_OBJECT}' at {file_name!r} with {length!r} bytes (a file of the "
            f"checkpoint directory, at most {max_bytes:,} bytes, is read): the checkpoint is damaged"
        )
    holder = {COMMON_STATE_KEY: io.BytesIO()}
    try:
        torch_dcp.load(holder, storage_reader=_SafeFileSystemReader(checkpoint_dir),
                       planner=_SafeLoadPlanner(allowed=safe_load.COMMON_STATE_ALLOWED), no_dist=True)
    except torch_dcp.api.CheckpointException as error:  # torch wraps the reader's one-line refusal
        raise refused_file(error) or CheckpointError(f"{checkpoint_dir}: its '{COMMON_STATE_OBJECT}' object cannot "
                                                     f"be read ({describe_load_error(error)})") from None
    loaded = holder[COMMON_STATE_KEY]  # the writer stores [data] (one list entry per object it was given)
    if not (isinstance(loaded, list) and len(loaded) == 1 and isinstance(loaded[0], dict)):
        raise CheckpointError(f"{checkpoint_dir / file_name}: its '{COMMON_STATE_OBJECT}' object is "
                              "not a state dict: the checkpoint is damaged")
    return loaded[0]


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


class _InProcessTorchDistSaveStrategy(TorchDistSaveStrategy):
    """Writes megatron-core's torch_dist format with torch's FileSystemWriter, in the calling thread.

    Collectives: those of torch.distributed.checkpoint.save (gather of the save plans to rank 0, scatter
    of the global plan, gather of the write results) over the default group.
    """

    def __init__(self):
        super().__init__(_FORMAT_BACKEND, _FORMAT_VERSION)

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        torch_dcp.save(_torch_state_dict(sharded_state_dict), storage_writer=_writer(checkpoint_dir),
                       planner=_planner())

    def async_save(self, *args, **kwargs):
        # megatron's async save forks writer processes, which is what this strategy exists to avoid.
        raise NotImplementedError("the in-process strategy saves synchronously; see write_sharded_async")
