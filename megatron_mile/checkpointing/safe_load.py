"""Reading the pickled files of a checkpoint without trusting them.

A checkpoint directory is data a user hands us, and pickle runs whatever code a file names. So:

- torch files (common.pt, rng/rank_*.pt, the tensor records inside ``__<rank>_0.distcp``) are read with
  ``torch.load(..., weights_only=True)``, whatever torch's default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says,
  admitting beyond tensors and plain data exactly the classes of `COMMON_STATE_ALLOWED` (Megatron-LM's
  common state: its argparse ``args`` and the enums in it) and, for the byte records of sharded objects, `OBJECT_SHARD_ALLOWED`
  (numpy's RNG state in Megatron-LM's ``rng_state``); the classes other libraries registered with torch
  (megatron-core registers its own on import) are set aside while a checkpoint file is read;
- the pickled torch_dist ``.metadata`` goes through `MetadataUnpickler`, which admits the checkpoint-metadata
  classes only (`METADATA_PICKLE_ALLOWED`).

A file that is refused (it names a global outside the allow-list) or damaged (truncated, not a torch file)
raises CheckpointError with one line naming the file. The message never repeats torch's advice to retry
with weights_only=False or to allow-list the global: for a checkpoint that is the unsafe thing to do.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import signal
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import numpy as np
import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.enums import AttnBackend, CudaGraphScope
from torch.distributed.checkpoint.metadata import Metadata

from megatron_mile.checkpointing.errors import CheckpointError

# Globals a torch_dist `.metadata` pickle may reference: the checkpoint-metadata dataclasses, the save plan
# items torch stores with them, torch's size/dtype/layout values and the plain containers pickle builds them
# with. Nothing that runs code.
METADATA_PICKLE_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by its name, nothing else
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}

# Classes common.pt may hold beyond tensors and plain data: Megatron-LM's `args` is an argparse.Namespace of
# plain values, torch dtypes (admitted by torch itself) and the enums its argument parser and get_model put
# there (core_r0.16.0): `model_type` (ModelType), `attention_backend` (AttnBackend), `exit_signal`
# (signal.Signals) and, with --cuda-graph-scope, CudaGraphScope members. An enum is rebuilt by looking its
# member up by value, which runs no code of the file; admitting them keeps the args whole (a checkpoint's args
# are also what --use-checkpoint-args reads), where mapping them to strings would need a custom unpickler.
COMMON_STATE_ALLOWED = (argparse.Namespace, ModelType, AttnBackend, CudaGraphScope, signal.Signals)
# Classes the byte records of sharded objects may hold: Megatron-LM's rng_state keeps numpy's RNG state, a
# tuple with a uint32 array (numpy's array reconstruction, as torch's own numpy support admits it).
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
OBJECT_SHARD_ALLOWED = (_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)
_ALLOWLIST_LOCK = threading.Lock()
# Size limits checked before a file is read: common.pt and the RNG files hold arguments, counters and RNG
# states (kilobytes to a few megabytes); `.metadata` indexes every tensor shard (tens of megabytes for the
# largest models' optimizer states).
MAX_PICKLED_FILE_BYTES = 256 * 2**20
MAX_METADATA_BYTES = 2 * 2**30

# How torch's weights-only unpickler names a refused global ("... GLOBAL posix.mkdir ...").
_REFUSED_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
# Sentences of torch's messages that advise loosening the check (never passed on) or only point at torch's
# documentation and issue tracker.
_UNSAFE_ADVICE_RE = re.compile(
    r"weights.only|safe_globals|trusted source|arbitrary code|file an issue|check the documentation", re.IGNORECASE
)
_MAX_REASON_CHARS = 240


class MetadataUnpickler(pickle.Unpickler):
    """Unpickler for a torch_dist `.metadata` file that refuses every global outside a fixed allow-list.

    Raises pickle.UnpicklingError("... refers to <module>.<name> ...; refusing ...") for any other global.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_PICKLE_ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            # dtypes, layouts and memory formats are pickled as `torch.<name>` values.
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to GLOBAL {module}.{name}, which a checkpoint's metadata never needs; "
            "refusing to load it (the file may be tampered with)"
        )


@contextlib.contextmanager
def only_allowed_globals(allowed=COMMON_STATE_ALLOWED) -> Iterator[None]:
    """torch's weights-only unpickler admits, beyond tensors and plain data, exactly `allowed` inside this
    block: the classes registered process-wide (torch.serialization.add_safe_globals, e.g. by megatron-core
    on import) are set aside and put back after. No collectives."""
    with _ALLOWLIST_LOCK:
        registered = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        try:
            torch.serialization.add_safe_globals(list(allowed))
            yield
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(registered)


def load_weights_only(source: Union[str, Path, BinaryIO], name: Optional[Union[str, Path]] = None,
                      allowed=COMMON_STATE_ALLOWED, max_bytes: Optional[int] = None) -> Any:
    """torch.load(source) restricted to tensors, plain data and the classes `allowed`, onto the CPU.

    `source` is a path or a seekable binary file; `name` is how messages call it (default: the path). A file
    larger than `max_bytes` (default MAX_PICKLED_FILE_BYTES) is refused before it is read. Raises
    CheckpointError naming the file when it is missing, too large, refused or damaged. No collectives.
    """
    shown = name if name is not None else source
    _check_size(source, MAX_PICKLED_FILE_BYTES if max_bytes is None else max_bytes)
    try:
        with only_allowed_globals(allowed):
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to parse an untrusted file is reported the same way
        raise unreadable_file_error(shown, error) from None


def load_checkpoint_metadata(path: Union[str, Path]) -> Any:
    """A torch_dist `.metadata` file, unpickled by MetadataUnpickler.

    Raises CheckpointError naming the file when it is missing, refused or damaged. No collectives.
    """
    _check_size(path, MAX_METADATA_BYTES)
    try:
        with open(path, "rb") as handle:
            metadata = MetadataUnpickler(handle).load()
    except Exception as error:  # noqa: BLE001 - as in load_weights_only
        raise unreadable_file_error(path, error) from None
    # The allow-list admits the classes, not their arrangement: check the fields the readers use.
    if not (isinstance(metadata, Metadata) and isinstance(metadata.state_dict_metadata, dict)
            and isinstance(metadata.storage_data, (dict, type(None)))):
        raise CheckpointError(f"{path} is not torch.distributed.checkpoint metadata: the checkpoint is damaged; "
                              "resume from another iteration")
    return metadata


def _check_size(source: Union[str, Path, BinaryIO], max_bytes: int) -> None:
    """CheckpointError when file `source` (a path; open files are not checked) is larger than `max_bytes`.
    A missing file passes: its reader reports it."""
    if not isinstance(source, (str, Path)) or not Path(source).is_file():
        return
    size = Path(source).stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{source} is {size:,} bytes, more than the {max_bytes:,} such a file of a checkpoint "
                              "can hold: the checkpoint is damaged; resume from another iteration")


def unreadable_file_error(path: Union[str, Path], error: BaseException) -> CheckpointError:
    """The one-line CheckpointError for a checkpoint file that `error` kept from being read.

    A refused global is named ("refusing to load F: it refers to posix.mkdir ..."); any other failure is
    reported as damage with the cause's first sentence, stripped of advice to relax the safe loading.
    """
    if isinstance(error, CheckpointError):
        return error
    if isinstance(error, FileNotFoundError):
        return CheckpointError(f"{path} is missing: the checkpoint is incomplete; resume from another iteration")
    refused = _REFUSED_GLOBAL_RE.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if refused:
        return CheckpointError(
            f"refusing to load {path}: it refers to {refused.group(1)}, which a checkpoint never "
            "holds (the file may have been tampered with); nothing in it was run. Use a checkpoint you trust"
        )
    return CheckpointError(
        f"cannot read {path}: {safe_reason(error)}; the file is damaged or was not written by megatron_mile. "
        "Resume from another iteration"
    )


def safe_reason(error: BaseException) -> str:
    """`error` as one short line ("Type: message"), without sentences that advise unsafe loading."""
    # torch's messages put advice and the actual error in separate lines and sentences.
    pieces = re.split(r"\n+|(?<=\.)\s+", str(error))
    kept = [" ".join(p.split()) for p in pieces if p.strip() and not _UNSAFE_ADVICE_RE.search(p)]
    reason = " ".join(kept) or "its content is not plain tensors and data"
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[: _MAX_REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {reason}"
