"""megatron_mile.atomic_io: files and directories appear complete or not at all, durably, with normal modes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from megatron_mile import atomic_io


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards); returns a setter."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def fsynced(monkeypatch):
    """The paths os.fsync was called on, in call order."""
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(_fd_path(fd))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


class Boom(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def test_text_is_written_and_renamed(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    assert atomic_io.write_text_atomic(target, "new content\n") == target
    assert target.read_text() == "new content\n"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_json_round_trips_and_bad_json_creates_nothing(tmp_path):
    target = tmp_path / "r.json"
    atomic_io.write_json_atomic(target, {"b": [1, 2.5, None], "a": "x"}, indent=1, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": "x", "b": [1, 2.5, None]}
    assert target.read_text().endswith("}\n")
    with pytest.raises(ValueError):
        atomic_io.write_json_atomic(tmp_path / "nan.json", {"x": float("nan")}, allow_nan=False)
    assert os.listdir(tmp_path) == ["r.json"]


def test_exception_mid_write_keeps_old_target_and_removes_temp(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old bytes")
    with pytest.raises(Boom):
        with atomic_io.atomic_open(target, "wb") as handle:
            handle.write(b"half of the new")
            raise Boom()
    assert target.read_bytes() == b"old bytes"
    assert os.listdir(tmp_path) == ["data.bin"]

    with pytest.raises(Boom):
        with atomic_io.atomic_path(tmp_path / "fresh.txt") as tmp:
            tmp.write_text("partial")
            raise Boom()
    assert os.listdir(tmp_path) == ["data.bin"]


def test_failed_rename_keeps_old_target_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "t.txt"
    target.write_text("old")

    def replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_io.write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["t.txt"]


def test_atomic_file_commit_and_discard(tmp_path):
    kept, dropped = atomic_io.AtomicFile(tmp_path / "kept"), atomic_io.AtomicFile(tmp_path / "dropped")
    kept.path.write_text("k")
    dropped.path.write_text("d")
    assert kept.path.parent == tmp_path and not (tmp_path / "kept").exists()  # invisible before commit
    kept.commit()
    dropped.discard()
    assert os.listdir(tmp_path) == ["kept"]
    assert (tmp_path / "kept").read_text() == "k"


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_file_mode_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    plain = tmp_path / "plain.txt"
    atomic_io.write_text_atomic(plain, "x")
    assert _mode(plain) == expected
    # A writer that makes its file private (as mkstemp or safetensors' save_file do) still yields the
    # normal mode once committed.
    private = tmp_path / "private.bin"
    with atomic_io.atomic_path(private) as tmp:
        os.remove(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"payload")
        os.close(fd)
    assert private.read_bytes() == b"payload"
    assert _mode(private) == expected


def test_file_and_directory_are_fsynced(tmp_path, fsynced):
    target = tmp_path / "durable.txt"
    atomic_io.write_text_atomic(target, "x")
    temp_files = [p for p in fsynced if Path(p).parent == tmp_path and Path(p).name.startswith(".durable.txt.tmp-")]
    assert len(temp_files) == 1  # the data, before the rename
    assert fsynced.index(temp_files[0]) < fsynced.index(str(tmp_path))  # the directory entry, after it
    assert str(tmp_path) in fsynced


# ----------------------------------------------------------------------------------------------------------
# Directories
# ----------------------------------------------------------------------------------------------------------


def test_directory_commit_replaces_an_existing_directory(tmp_path, umask):
    umask(0o022)
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    with atomic_io.atomic_directory(output) as tmp:
        assert tmp.parent == tmp_path and tmp != output
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        fd = os.open(tmp / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        assert (output / "stale.txt").exists()  # the old directory stays until the block ends
    assert os.listdir(tmp_path) == ["out"]
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*")) == ["sub", "sub/a.txt", "weights.bin"]
    assert _mode(output / "weights.bin") == 0o644 and _mode(output / "sub" / "a.txt") == 0o644


def test_directory_failure_leaves_old_directory_and_no_temp(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_io.atomic_directory(output) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise Boom()
    assert os.listdir(tmp_path) == ["out"]
    assert os.listdir(output) == ["keep.txt"] and (output / "keep.txt").read_text() == "old"

    with pytest.raises(Boom):
        with atomic_io.atomic_directory(tmp_path / "new") as tmp:
            (tmp / "half.txt").write_text("partial")
            raise Boom()
    assert os.listdir(tmp_path) == ["out"]


def test_directory_contents_and_parent_are_fsynced(tmp_path, fsynced):
    with atomic_io.atomic_directory(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
    synced_before_rename = {os.path.relpath(p, tmp) for p in fsynced if p.startswith(str(tmp))}
    assert synced_before_rename == {".", "sub", os.path.join("sub", "a.txt"), "b.txt"}
    assert fsynced[-1] == str(tmp_path)  # the rename made durable last
