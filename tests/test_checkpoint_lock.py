"""A save directory has one writer: a run locks --save at set-up (before any training work), a second run is
refused on every rank with the holder named, a stale lock is taken over, the lock is released however the
run ends, and a run clears only its own leftover temp directories. Output directories are checked at
start-up too.

Loop-level workers run pretrain() in spawned gloo processes (tests/conftest.py: dist_pool).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_cases import LOOP_ARGS

from megatron_mile import atomic_io
from megatron_mile.atomic_io import OutputDirectoryError, ensure_writable_directory
from megatron_mile.checkpointing import lock as save_lock
from megatron_mile.checkpointing.lock import LOCK_FILENAME, SaveDirectoryLock, SaveDirectoryLocked
from megatron_mile.checkpointing.tracker import remove_leftovers, temp_checkpoint_name

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory: Path, **fields) -> Path:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "run_id": "0badc0de"}
    holder.update(fields)
    path = directory / LOCK_FILENAME
    path.write_text(json.dumps(holder))
    return path


# ------------------------------------------------------------------ the lock itself (no processes)


def test_lock_records_the_holder_and_is_released(tmp_path):
    lock = SaveDirectoryLock.acquire(tmp_path)
    content = json.loads((tmp_path / LOCK_FILENAME).read_text())
    assert content["host"] == socket.gethostname() and content["pid"] == os.getpid()
    assert abs(content["started"] - time.time()) < 60 and content["run_id"] == lock.holder.run_id
    assert save_lock.run_id_for(tmp_path) == lock.holder.run_id
    lock.release()
    lock.release()  # idempotent
    assert not (tmp_path / LOCK_FILENAME).exists()
    assert save_lock.run_id_for(tmp_path) != lock.holder.run_id
    SaveDirectoryLock.acquire(tmp_path).release()  # free again


def test_second_writer_is_refused_with_directory_and_holder(tmp_path):
    first = SaveDirectoryLock.acquire(tmp_path)
    try:
        with pytest.raises(SaveDirectoryLocked) as raised:
            SaveDirectoryLock.acquire(tmp_path)
        message = str(raised.value)
        assert str(tmp_path.resolve()) in message and f"pid {os.getpid()}" in message
        assert socket.gethostname() in message and first.holder.run_id in message
        assert "\n" not in message
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["run_id"] == first.holder.run_id
    finally:
        first.release()


def test_lock_works_without_hard_links(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(save_lock.os, "link", no_links)
    lock = SaveDirectoryLock.acquire(tmp_path)
    try:
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["run_id"] == lock.holder.run_id
        with pytest.raises(SaveDirectoryLocked):
            SaveDirectoryLock.acquire(tmp_path)
    finally:
        lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    logged = []
    lock = SaveDirectoryLock.acquire(tmp_path, log=logged.append)
    try:
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == os.getpid()
        assert len(logged) == 1 and "stale" in logged[0] and f"pid {dead}" in logged[0]
    finally:
        lock.release()


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    # Our own pid, but written long before this process started: the pid was recycled.
    _write_lock(tmp_path, pid=os.getpid(), started=time.time() - 10 * 365 * 86400)
    logged = []
    SaveDirectoryLock.acquire(tmp_path, log=logged.append).release()
    assert logged


@pytest.mark.parametrize("content, expected", [
    ({"host": "some-other-host.example", "pid": 1}, "on another host"),
    ({"pid": os.getppid()}, "still running"),  # a live process on this host
])
def test_live_or_unverifiable_lock_is_not_taken_over(tmp_path, content, expected):
    path = _write_lock(tmp_path, **content)
    before = path.read_text()
    with pytest.raises(SaveDirectoryLocked, match=expected) as raised:
        SaveDirectoryLock.acquire(tmp_path)
    assert f"delete {path.resolve()}" in str(raised.value)
    assert path.read_text() == before


def test_unreadable_lock_is_refused(tmp_path):
    (tmp_path / LOCK_FILENAME).write_text("not json")
    with pytest.raises(SaveDirectoryLocked, match="unreadable lock file"):
        SaveDirectoryLock.acquire(tmp_path)


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = SaveDirectoryLock.acquire(tmp_path)
    other = _write_lock(tmp_path, run_id="feedf00d")  # e.g. taken over by another host's run
    lock.release()
    assert json.loads(other.read_text())["run_id"] == "feedf00d"


def test_a_run_removes_only_its_own_leftover_temp_directories(tmp_path):
    ours_crashed = tmp_path / temp_checkpoint_name(2, "aaaa1111", "0123456789ab")
    ours_current = tmp_path / temp_checkpoint_name(3, "aaaa1111", "ba9876543210")
    theirs = tmp_path / temp_checkpoint_name(2, "bbbb2222", "0123456789ab")  # another run's save in progress
    old_copy = tmp_path / ".iter_0000001.old-1234abcd"  # after a crash mid re-save: the only copy
    for path in (ours_crashed, ours_current, theirs, old_copy):
        path.mkdir()
    remove_leftovers(tmp_path, "aaaa1111", keep=ours_current)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (ours_current, theirs, old_copy))


# ------------------------------------------------------------------ output directories (no processes)


def test_writable_directory_is_created(tmp_path):
    assert ensure_writable_directory(tmp_path / "a" / "b", "--save") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def test_a_file_is_not_an_output_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirectoryError, match=r"--save .*/f is a file"):
        ensure_writable_directory(tmp_path / "f", "--save")
    with pytest.raises(OutputDirectoryError, match=r"--tensorboard-dir .*/f/tb cannot be created"):
        ensure_writable_directory(tmp_path / "f" / "tb", "--tensorboard-dir")


def test_read_only_directory_is_refused(tmp_path, monkeypatch):
    # Tests run as root here, for which permission bits do not stop writes: refuse the probe file instead,
    # as a read-only mount does.
    real_open = os.open

    def read_only_open(path, flags, *args):
        if flags & os.O_CREAT and Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic_io.os, "open", read_only_open)
    with pytest.raises(OutputDirectoryError, match="--save .* is not writable: Read-only file system"):
        ensure_writable_directory(tmp_path, "--save")


# ------------------------------------------------------------------ through pretrain(), 2 ranks on gloo

_PROVIDER_CALLS = []


def recording_model_provider(config, vocab_size):
    """build_model, noting the --save lock's content as seen when the model is built."""
    from megatron_mile.model import build_model

    lock_file = Path(config.training.save) / LOCK_FILENAME if config.training.save else None
    _PROVIDER_CALLS.append(json.loads(lock_file.read_text()) if lock_file and lock_file.exists() else None)
    return build_model(config, vocab_size)


def worker_pretrain_outcome(extra, world_size, fail_in_training=False):
    """{'error': (type name, message)} or {'iterations': n}, and the lock contents seen at model building."""
    from megatron_mile.arguments import parse_args
    from megatron_mile.training import loop

    _PROVIDER_CALLS.clear()
    original = loop.train_step

    def failing_step(*args, **kwargs):
        raise RuntimeError("simulated failure in a training step")

    if fail_in_training:
        loop.train_step = failing_step
    try:
        result = loop.pretrain(parse_args(LOOP_ARGS + extra, world_size=world_size),
                               model_provider=recording_model_provider)
        outcome = {"iterations": result.final_iteration}
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        outcome = {"error": (type(error).__name__, str(error))}
    finally:
        loop.train_step = original
    return outcome, list(_PROVIDER_CALLS), os.getpid()


def test_second_run_on_a_locked_directory_stops_every_rank_before_training(dist_pool, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    holder = SaveDirectoryLock.acquire(save)  # "another run": this test process, alive
    try:
        per_rank = dist_pool(2).run(worker_pretrain_outcome, ["--save", str(save)], 2)
    finally:
        holder.release()
    for outcome, provider_calls, _ in per_rank:
        kind, message = outcome["error"]
        assert kind == "SaveDirectoryLocked"  # a ValueError: the command line exits 1 with the message
        assert str(save.resolve()) in message and f"pid {os.getpid()}" in message and "\n" not in message
        assert provider_calls == []  # no model was built
    assert not list(save.glob("iter_*"))


def test_lock_is_held_during_a_run_and_released_after_it(dist_pool, tmp_path):
    save = tmp_path / "run"
    dead = _dead_pid()
    save.mkdir()
    _write_lock(save, pid=dead)  # a stale lock: taken over
    per_rank = dist_pool(2).run(worker_pretrain_outcome, ["--save", str(save)], 2)
    rank0_pid = per_rank[0][2]
    for outcome, provider_calls, _ in per_rank:
        assert outcome == {"iterations": 4}
        assert [seen["pid"] for seen in provider_calls] == [rank0_pid]  # rank 0 held it while building
    assert not (save / LOCK_FILENAME).exists()


@pytest.mark.parametrize("failure", ["setup", "training"])
def test_lock_is_released_after_a_failed_run(dist_pool, tmp_path, failure):
    save = tmp_path / "run"
    extra = ["--save", str(save)]
    if failure == "setup":
        extra += ["--load", str(tmp_path / "missing")]  # fails after the lock was taken
    per_rank = dist_pool(2).run(worker_pretrain_outcome, extra, 2, failure == "training")
    for outcome, _, _ in per_rank:
        assert "error" in outcome
        assert ("does not exist" if failure == "setup" else "simulated failure") in outcome["error"][1]
    assert save.is_dir() and not (save / LOCK_FILENAME).exists()
    # And the directory is free for the next run.
    outcome, _, _ = dist_pool(2).run(worker_pretrain_outcome, ["--save", str(save), "--train-iters", "1"], 2)[0]
    assert outcome == {"iterations": 1}


@pytest.mark.parametrize("flag", ["--save", "--tensorboard-dir"])
def test_unwritable_output_directory_stops_every_rank_before_training(dist_pool, tmp_path, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    per_rank = dist_pool(2).run(worker_pretrain_outcome, [flag, str(blocker / "out")], 2)
    for outcome, provider_calls, _ in per_rank:
        kind, message = outcome["error"]
        assert kind == "OutputDirectoryError" and flag in message and str(blocker / "out") in message
        assert provider_calls == []


def test_entry_script_on_a_locked_directory_exits_1_with_one_line(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    holder = SaveDirectoryLock.acquire(save)
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "pretrain_gpt_mile.py"), *LOOP_ARGS, "--save", str(save)],
            capture_output=True, text=True, cwd=REPO, timeout=300,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    finally:
        holder.release()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(save.resolve()) in errors[0] and f"pid {os.getpid()}" in errors[0], proc.stderr
