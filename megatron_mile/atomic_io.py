"""Atomic output: a file or directory appears complete under its name, or not at all.

Every writer of the project goes through here, so that a crash, a full disk or a Ctrl-C never leaves a
half-written checkpoint, export, dataset, tokenizer or report under its final name. The recipe (POSIX):

1. write into a temporary sibling in the same directory (``.<name>.tmp-<hex>``), so that the final step
   is a rename within one file system;
2. fsync the data (every file of a directory tree, and the tree's directories);
3. rename the temporary over the target (``os.replace``; a directory target is first moved aside to
   ``.<name>.old-<hex>``, since a rename cannot replace a non-empty directory);
4. fsync the parent directory: the rename itself is durable only then.

On an exception before the rename the temporary is removed and the old target is left untouched.

`ensure_writable_directory` checks an output directory at start-up, before a run does any work.

Permissions: files get ``0o666 & ~umask``, what ``open()`` gives a new file. Temporary files made with
``tempfile.mkstemp`` are 0600, and some libraries write that way internally (safetensors' ``save_file``
writes through a private temp file): a committed file is set to the normal mode whatever its writer did.
Directories are made with ``os.mkdir`` (``0o777 & ~umask``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import IO, Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """``0o666 & ~umask``: the permission bits ``open()`` gives a new file in this process."""
    try:
        # Linux reports the umask without changing it; os.umask can only read it by setting it.
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def temp_sibling(target: PathLike, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `target`: ``.<name>.<kind>-<8 hex digits>``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{secrets.token_hex(4)}")


def fsync_file(path: PathLike) -> None:
    """Flush a file's data to disk (it may have been written through another handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries: a rename or a new file in it is durable only after this."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class AtomicFile:
    """A temporary file beside `target` that becomes `target` on commit().

    The temporary exists (empty, normal permissions) from construction on; write it through `path`
    (any writer that takes a path) or open it yourself. As a context manager it commits on a normal exit
    and discards on an exception. For writers that keep a file open across calls (a streaming dataset
    writer) or rename several files together in a chosen order, call commit()/discard() directly.
    """

    def __init__(self, target: PathLike) -> None:
        self.target = Path(target)
        self.path = temp_sibling(self.target)
        self.mode = default_file_mode()
        # O_EXCL: the name is ours alone. The mode argument goes through the umask, as open()'s does.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        self.done = False

    def commit(self) -> Path:
        """fsync the temporary, give it the normal mode, rename it over the target, fsync the directory."""
        fsync_file(self.path)
        os.chmod(self.path, self.mode)
        # str arguments: os.replace is the one call tests intercept to simulate a crash before it.
        os.replace(os.fspath(self.path), os.fspath(self.target))
        self.done = True
        fsync_dir(self.target.parent)
        return self.target

    def discard(self) -> None:
        """Remove the temporary (whatever it became); the target is left as it was."""
        if not self.done:
            _remove(self.path)
            self.done = True

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.commit()
        except BaseException:
            self.discard()
            raise


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """``with atomic_path(t) as tmp: writer(tmp)``: the temporary path for a writer that takes a path."""
    with AtomicFile(target) as pending:
        yield pending.path


@contextlib.contextmanager
def atomic_open(target: PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``with atomic_open(t, "wb") as f: f.write(...)``: a file object whose content becomes `target`.

    `mode` must be a write mode ("w" or "wb"); `open_kwargs` go to open() (encoding, newline...).
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(target) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def write_text_atomic(target: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `target` atomically; returns the target path."""
    with atomic_open(target, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(target)


def write_json_atomic(target: PathLike, value: Any, **dump_kwargs: Any) -> Path:
    """Write `value` as JSON (json.dumps with `dump_kwargs`, plus a final newline) to `target` atomically.

    Raises whatever json.dumps raises (TypeError, ValueError for NaN with allow_nan=False) before
    anything is created.
    """
    return write_text_atomic(target, json.dumps(value, **dump_kwargs) + "\n")


def _normalise_tree(root: Path, file_mode: int) -> None:
    """fsync every file and directory below `root` (deepest first), files set to `file_mode`."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            os.chmod(path, file_mode)
            fsync_file(path)
        fsync_dir(directory)


def replace_directory(tmp: PathLike, target: PathLike) -> Path:
    """Make the finished directory `tmp` the directory `target`, replacing an existing one.

    Every file below `tmp` is fsynced and given the normal mode, then `tmp` is renamed to `target`
    (an existing `target` is first renamed aside to ``.<name>.old-<hex>`` and removed once the new one
    is in place) and the parent directory is fsynced. A crash leaves the old directory or the new one
    under `target`; only in the instant between the two renames is `target` missing, with the old copy
    under the .old- name. `tmp` must be on the same file system as `target` (a sibling). Returns `target`.
    """
    tmp, target = Path(tmp), Path(target)
    _normalise_tree(tmp, default_file_mode())
    old = None
    if target.exists():
        old = temp_sibling(target, "old")
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """``with atomic_directory(t) as tmp: <write files into tmp>``: `tmp` replaces `t` when the block ends.

    The temporary directory is a sibling of `target` (its parent is created if missing); an exception in
    the block removes it and leaves `target` untouched. See replace_directory for the commit.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    os.mkdir(tmp)
    try:
        yield tmp
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class OutputDirectoryError(ValueError):
    """An output directory (--save, --tensorboard-dir ...) is not a writable directory; one line says why.

    A ValueError, so that the training command line reports it as a failed run without a traceback.
    """


def ensure_writable_directory(path: PathLike, what: str) -> Path:
    """Create `path` (with its parents) if missing and check that files can be created in it; returns it.

    For a run's output directories, checked at start-up instead of at the first write, after training work.
    `what` names the directory in messages (e.g. the flag "--save"). Raises OutputDirectoryError naming
    `what` and the path when it is a file, cannot be created, or refuses a new file (read-only file system,
    permissions).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(f"{what} {path} is a file, not a directory: give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirectoryError(
            f"{what} {path} cannot be created: {error.strerror or error} ({error.filename or path}); "
            "give a directory this run can write"
        ) from None
    probe = temp_sibling(path / "write-test")
    try:
        # A real file, not os.access: access() ignores some read-only mounts and network-file-system rules.
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        raise OutputDirectoryError(
            f"{what} {path} is not writable: {error.strerror or error}; give a directory this run can write"
        ) from None
    os.remove(probe)
    return path
