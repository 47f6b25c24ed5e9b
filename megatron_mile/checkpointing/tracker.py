"""The save directory: iteration directory names, the latest-iteration tracker file, each checkpoint's
plain-data description (mile_checkpoint.json), and finding the checkpoint to load. No collectives here.

Layout of a save directory (Megatron-LM's names)::

    {dir}/latest_checkpointed_iteration.txt     the newest complete iteration, as a decimal integer
    {dir}/iter_0000100/                         one checkpoint (see megatron_mile.checkpointing)
    {dir}/iter_0000200.tmp-<run>-<hex>/         a save in progress, or one that crashed: never loaded
    {dir}/megatron_mile.lock                    the run writing the directory (checkpointing.lock)

Megatron-LM also knows a tracker holding the word ``release`` with the checkpoint in ``{dir}/release/`` (what its
checkpoint converters write): weights only, loaded at iteration 0 (resolve_checkpoint_dir reads it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

from megatron_mile.atomic_io import write_text_atomic

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "mile_checkpoint.json"
RNG_DIRNAME = "rng"
FORMAT = "torch_dist"
FORMAT_VERSION = 1
# Megatron-LM's tracker word and directory name for a converted checkpoint (weights only, iteration 0).
RELEASE = "release"

_ITER_DIR_RE = re.compile(r"^iter_(\d{7,})$")


def temp_checkpoint_name(iteration: int, run_id: str, token: str) -> str:
    """Name of a save's temp directory: the run id says whose it is (see remove_leftovers)."""
    return f"{checkpoint_name(iteration)}.tmp-{run_id}-{token}"


def checkpoint_name(iteration: int) -> str:
    """Directory name of one checkpoint, as Megatron-LM spells it."""
    return f"iter_{iteration:07d}"


def read_latest_iteration(directory) -> Optional[int]:
    """The iteration in `directory`/latest_checkpointed_iteration.txt; None when the file does not exist.

    Raises ValueError when the file holds anything but one non-negative integer.
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
            f"{list_iterations(Path(directory)) or 'none'}) into it, or delete it to start from scratch"
        )
    return int(text)


def write_latest_iteration(directory: Path, iteration: int) -> None:
    """Point the tracker file at `iteration` (atomically: readers see the old or the new number)."""
    write_text_atomic(Path(directory) / TRACKER_FILENAME, f"{iteration}\n")


def list_iterations(directory: Path) -> List[int]:
    """Iterations of the complete-looking iter_XXXXXXX directories (temp directories are ignored)."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _ITER_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


def remove_leftovers(directory: Path, run_id: str, keep: Path) -> None:
    """Delete run `run_id`'s temp directories of saves that failed before their commit (never loaded).

    Only this run's: another run's temp directory may be a save in progress. Old copies moved aside while
    re-saving an iteration (atomic_io's ``.iter_XXXXXXX.old-<hex>``) are kept: after a crash between the two
    renames one holds the only copy of that iteration.
    """
    own = re.compile(rf"^iter_\d{{7,}}\.tmp-{re.escape(run_id)}-[0-9a-f]+$")
    for entry in directory.iterdir():
        if own.match(entry.name) and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


class MegatronLMCheckpoint(FileNotFoundError):
    """An iteration directory in Megatron-LM's torch_dist layout without this project's description: a
    checkpoint written by Megatron-LM. `path` is the iteration directory."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} was written by Megatron-LM (torch_dist, no {METADATA_FILENAME})")
        self.path = path


def written_by_megatron_lm(path: Path) -> bool:
    """Whether iteration directory `path` looks like Megatron-LM's torch_dist checkpoint: megatron's format tag
    (metadata.json) and ``common.pt`` or torch's ``.metadata`` (megatron-core 0.17+ keeps the common state
    among the shards, which only reading it checks: torch_dist.read_common_state), and none of this project's
    description. File names only; no collectives."""
    return (path / "metadata.json").is_file() and \
        ((path / "common.pt").is_file() or (path / ".metadata").is_file()) and \
        not (path / METADATA_FILENAME).is_file()


def resolve_checkpoint_dir(load_dir, iteration: Optional[int],
                           megatron_lm: bool = False) -> Tuple[Optional[Path], Optional[int]]:
    """(iter directory, iteration) to load; (None, None) when `load_dir` holds no checkpoint at all.

    Raises FileNotFoundError / NotADirectoryError naming the path and the fix when `load_dir` is missing,
    is a file or is one checkpoint, when checkpoints exist without a tracker file, or when the tracked
    iteration is missing or incomplete; ValueError for a corrupt tracker file; MegatronLMCheckpoint (a
    FileNotFoundError) for a checkpoint Megatron-LM wrote, unless the caller reads those (`megatron_lm`).
    """
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        if load_dir.exists():
            raise NotADirectoryError(f"checkpoint path {load_dir} is a file, not a directory: pass the "
                                     f"directory that was given to --save")
        raise FileNotFoundError(
            f"checkpoint directory {load_dir} does not exist: check the --load path, or drop --load to "
            "train from scratch"
        )
    if iteration is None and _tracks_release(load_dir):
        return _release_checkpoint(load_dir, megatron_lm)
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
        if iteration is None:
            existing = list_iterations(load_dir)
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
            f"{[checkpoint_name(i) for i in list_iterations(load_dir)] or 'none'}. Write one of their "
            f"iterations into {TRACKER_FILENAME}"
        )
    _refuse_legacy_torch_format(path)
    if written_by_megatron_lm(path):
        if megatron_lm:
            return path, iteration
        raise MegatronLMCheckpoint(path)
    if not (path / METADATA_FILENAME).is_file():
        raise FileNotFoundError(
            f"{path} has no {METADATA_FILENAME}: it is incomplete or was not written by megatron_mile. "
            f"Point {TRACKER_FILENAME} at another iteration"
        )
    return path, iteration


def _refuse_legacy_torch_format(path: Path) -> None:
    """FileNotFoundError when `path` holds Megatron-LM's legacy 'torch' checkpoint format (mp_rank_* files)."""
    if any(path.glob("mp_rank_*")):
        raise FileNotFoundError(
            f"{path} is a Megatron-LM checkpoint in its legacy 'torch' format (mp_rank_* files); only torch_dist "
            "is read: convert it with Megatron-LM (--ckpt-convert-format torch_dist, or tools/checkpoint/convert.py)"
        )


def _tracks_release(load_dir: Path) -> bool:
    tracker = load_dir / TRACKER_FILENAME
    return tracker.is_file() and tracker.stat().st_size < 64 and tracker.read_text(errors="replace").strip() == RELEASE


def _release_checkpoint(load_dir: Path, megatron_lm: bool) -> Tuple[Path, int]:
    """(load_dir/release, 0) for Megatron-LM's release tracker; FileNotFoundError when the directory is not
    there or is not a Megatron-LM torch_dist checkpoint, MegatronLMCheckpoint where such are not read."""
    path = load_dir / RELEASE
    if not path.is_dir():
        raise FileNotFoundError(f"{load_dir / TRACKER_FILENAME} says '{RELEASE}' but {path} does not exist")
    _refuse_legacy_torch_format(path)
    if not written_by_megatron_lm(path):
        raise FileNotFoundError(f"{path} (Megatron-LM's '{RELEASE}' checkpoint) is not in Megatron-LM's torch_dist "
                                "format (it needs metadata.json, and common.pt or .metadata)")
    if not megatron_lm:
        raise MegatronLMCheckpoint(path)
    return path, 0


def read_metadata(checkpoint_dir: Path) -> dict:
    """mile_checkpoint.json of one iter directory; ValueError when it is damaged, foreign or too new."""
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

    Keys: iteration, consumed_samples, consumed_valid_samples (absent in checkpoints of older versions),
    config (the run's config_to_dict), scheduler, layout, vocab, extra.
    Raises FileNotFoundError when `load_dir` holds no checkpoint.
    """
    path, iteration = resolve_checkpoint_dir(load_dir, iteration)
    if path is None:
        raise FileNotFoundError(f"{load_dir} holds no checkpoint (no {TRACKER_FILENAME})")
    return read_metadata(path)


def read_saved_config(load_dir, iteration: Optional[int] = None) -> dict:
    """The run's config dict saved with a checkpoint (config_from_dict rebuilds the RunConfig from it).

    Tools that rebuild the model from a checkpoint alone (export, evaluation) start here.
    """
    return read_checkpoint_metadata(load_dir, iteration)["config"]
