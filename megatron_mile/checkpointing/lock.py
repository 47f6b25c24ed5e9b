"""One writer per save directory: a lock file that a run holds from set-up to exit.

Two runs given the same --save would delete each other's saves in progress (each commit clears its leftover
temp directories) and interleave their checkpoints. So a training run's rank 0 takes
``{save}/megatron_mile.lock`` at set-up, before any training work, and releases it when the run ends,
normally or by an exception. The file holds plain JSON: the holder's host, pid, start time and run id.

Creation is exclusive and the content never partial: the JSON is written to a private temp file and
hard-linked to the lock name (``os.link`` fails when the name exists, atomically, also on NFS); on a file
system without hard links the lock is created with O_CREAT|O_EXCL and then written. A lock whose
holder is on this host and no longer running (its pid is gone, or belongs to a process started after the
lock was written) is stale: it is taken over with a log line. A lock from another host cannot be checked and
is never taken over: the message says which file to delete once that run is known to be gone.

The run id also names the run's temp directories (``iter_XXXXXXX.tmp-<run id>-<hex>``), so that a run
clears only its own leftovers (megatron_mile.checkpointing.save).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from megatron_mile.atomic_io import fsync_dir
from megatron_mile.checkpointing.errors import CheckpointError

LOCK_FILENAME = "megatron_mile.lock"
# Tolerance when comparing a process's start time (whole seconds of boot time, clock ticks) with the lock's.
_START_TIME_SLACK_S = 2.0
_TAKEOVER_ATTEMPTS = 5

# This process's run id when it holds no lock (direct save_checkpoint calls, tools): its temp directories
# are still its own.
_PROCESS_RUN_ID = secrets.token_hex(4)
# Locks this process holds, by resolved directory (released at interpreter exit if still held).
_HELD: Dict[Path, "SaveDirectoryLock"] = {}


class SaveDirectoryLocked(CheckpointError):
    """Another run holds the save directory's lock; the message names the directory, the holder and the fix."""


@dataclass(frozen=True)
class LockHolder:
    """The content of a lock file."""

    host: str
    pid: int
    started: float  # seconds since the epoch, when the lock was taken
    run_id: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"run {self.run_id} (pid {self.pid} on host {self.host}, started {when})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LockHolder":
        """Raises ValueError when `text` is not a lock file's JSON."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return cls(host=str(data["host"]), pid=int(data["pid"]), started=float(data["started"]),
                   run_id=str(data["run_id"]))


def run_id_for(directory) -> str:
    """The run id of the lock this process holds on `directory`, else this process's own id. No collectives."""
    held = _HELD.get(Path(directory).resolve())
    return held.holder.run_id if held is not None else _PROCESS_RUN_ID


class SaveDirectoryLock:
    """This process's exclusive claim on a save directory; `release()` gives it up (idempotent).

    Use `acquire` to take one. No collectives: in a distributed run rank 0 takes it (see
    megatron_mile.training.setup), and the decision is broadcast.
    """

    def __init__(self, directory: Path, holder: LockHolder) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILENAME
        self.holder = holder

    @classmethod
    def acquire(cls, directory, log=print) -> "SaveDirectoryLock":
        """Take `directory`'s lock (the directory must exist), taking over a stale one with a `log` line.

        Raises SaveDirectoryLocked naming the directory and the holder when a live run holds it (or one on
        another host, which cannot be checked), and when the lock file is unreadable.
        """
        directory = Path(directory).resolve()
        holder = LockHolder(socket.gethostname(), os.getpid(), time.time(), secrets.token_hex(4))
        lock = cls(directory, holder)
        for _ in range(_TAKEOVER_ATTEMPTS):
            if lock._create():
                _HELD[directory] = lock
                return lock
            current, text = _read_holder(lock.path)
            if text is None:
                continue  # released in between: try again
            if current is None or not _is_stale(current):
                raise SaveDirectoryLocked(_held_message(directory, lock.path, current, text))
            if _remove_if_unchanged(lock.path, text):
                log(f" taking over the stale lock {lock.path}: {current.describe()} is no longer running")
        raise SaveDirectoryLocked(
            f"could not lock the checkpoint directory {directory}: {lock.path} keeps changing (other runs are "
            "starting on it at the same time); start one run per --save directory"
        )

    def _create(self) -> bool:
        """Create the lock file with our content, exclusively; False when it exists."""
        staging = self.directory / f".{LOCK_FILENAME}.tmp-{secrets.token_hex(4)}"
        try:
            with open(staging, "x", encoding="utf-8") as handle:
                handle.write(self.holder.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(staging, self.path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(self.holder.to_json())
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_dir(self.directory)
            return True
        finally:
            staging.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if it is still ours (a takeover elsewhere is left alone). Idempotent."""
        if _HELD.get(self.directory) is not self:
            return
        del _HELD[self.directory]
        current, _ = _read_holder(self.path)
        if current == self.holder:
            self.path.unlink(missing_ok=True)


def release_all() -> None:
    """Release every lock this process still holds (at interpreter exit)."""
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(release_all)


def _read_holder(path: Path):
    """(LockHolder or None when unparsable, raw text); (None, None) when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None, None
    try:
        return LockHolder.from_json(text), text
    except (ValueError, KeyError, TypeError):
        return None, text


def _is_stale(holder: LockHolder) -> bool:
    """True when `holder` ran on this host and its process is gone (or its pid now names a newer process)."""
    if holder.host != socket.gethostname():
        return False  # another machine's processes cannot be checked from here
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = _process_start_time(holder.pid)
    return started is not None and started > holder.started + _START_TIME_SLACK_S


def _process_start_time(pid: int) -> Optional[float]:
    """When process `pid` started (seconds since the epoch), from /proc; None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        # Field 22 (starttime, clock ticks after boot); the command name before it may hold spaces.
        ticks = float(stat.rsplit(")", 1)[1].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def _remove_if_unchanged(path: Path, expected_text: str) -> bool:
    """Remove the stale lock at `path` if it still holds `expected_text`; True when removed.

    Moved aside first, then checked: if another run replaced the stale lock in between, its lock is put back.
    """
    aside = path.with_name(f".{LOCK_FILENAME}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_text(encoding="utf-8", errors="replace") == expected_text:
            return True
        try:
            os.link(aside, path)  # not the stale lock we judged: give it back
        except FileExistsError:
            pass  # taken again meanwhile: the next attempt reads whoever holds it
        except OSError:  # no hard links here
            if not path.exists():
                os.rename(aside, path)
        return False
    finally:
        aside.unlink(missing_ok=True)


def _held_message(directory: Path, path: Path, holder: Optional[LockHolder], text: str) -> str:
    if holder is None:
        shown = " ".join(text.split())[:80]
        return (f"the checkpoint directory {directory} has an unreadable lock file {path} ({shown!r}): if no run "
                f"uses this directory, delete {path}")
    where = "on this host and still running" if holder.host == socket.gethostname() else "on another host"
    return (f"the checkpoint directory {directory} is in use by {holder.describe()}, {where} ({path}). Two "
            "runs writing one --save directory delete each other's saves: give this run another --save, or, "
            f"if that run is no longer running, delete {path}")
