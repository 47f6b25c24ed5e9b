"""A full disk during a save: the previous checkpoint stays the latest, the partial save is removed, and every
rank stops with the same one-line message naming the directory, the bytes needed and the bytes free.

The disk fills by injection: inside the workers, files opened for writing whose name matches a pattern fail
with ENOSPC (or EDQUOT) after a few bytes, as a real full disk fails a write mid-file. Workers run in
spawned gloo processes (tests/conftest.py: dist_pool) at TP 2.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
from pathlib import Path

import pytest
from checkpoint_cases import build, full_params, make_config, run_step

from megatron_mile import checkpointing

class _FillingFile:
    """A file whose writes fail with `error_number` once more than `room` bytes were written."""

    def __init__(self, handle, error_number, room):
        self._handle, self._errno, self._room, self._written = handle, error_number, room, 0

    def write(self, data):
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self._written + size > self._room:
            raise OSError(self._errno, os.strerror(self._errno))
        self._written += size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


class disk_fills:
    """Context manager: on the given ranks, writes to files whose name matches `pattern` hit a full disk."""

    def __init__(self, pattern, ranks, error_number=errno.ENOSPC, room=600):
        import torch.distributed as dist

        self.active = dist.get_rank() in ranks
        self.pattern, self.errno, self.room = re.compile(pattern), error_number, room

    def _open(self, file, mode="r", *args, **kwargs):
        handle = self._real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wxa") and isinstance(file, (str, os.PathLike)) and \
                self.pattern.search(os.path.basename(os.fspath(file))):
            return _FillingFile(handle, self.errno, self.room)
        return handle

    def __enter__(self):
        self._real_open = builtins.open
        if self.active:
            builtins.open = io.open = self._open  # pathlib opens through io.open
        return self

    def __exit__(self, *exc):
        builtins.open = io.open = self._real_open


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def worker_full_disk_during_save(directory, pattern, ranks, room, error_number, previous):
    """Save iteration 1 (when `previous`), then try iteration 2 on a disk that fills; report what is left."""
    import torch.distributed as dist

    from megatron_mile.arguments import config_to_dict

    config = make_config(dropout=0.0)
    config_dict = config_to_dict(config)
    model, optimizer, scheduler = build(config)
    run_step(model, optimizer, scheduler, 1)
    if previous:
        checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 2, config_dict)
    saved = full_params(model)
    run_step(model, optimizer, scheduler, 2)
    with disk_fills(pattern, ranks, error_number, room):
        try:
            checkpointing.save_checkpoint(directory, 2, model, optimizer, scheduler, 4, config_dict)
            message = None
        except checkpointing.CheckpointError as error:
            message = str(error)
    dist.barrier()
    left = sorted(p.name for p in Path(directory).iterdir())
    latest = checkpointing.read_latest_iteration(directory)
    loaded = None
    if previous:
        model2, optimizer2, scheduler2 = build(make_config(dropout=0.0, seed=5))
        loaded = checkpointing.load_checkpoint(directory, model2, optimizer2, scheduler2, config_dict)
        assert all((full_params(model2)[k] == saved[k]).all() for k in saved)
    # The disk has room again: the same save now succeeds (nothing of the failed one is in the way).
    checkpointing.save_checkpoint(directory, 2, model, optimizer, scheduler, 4, config_dict)
    return message, left, latest, loaded


FULL_DISK_CASES = {
    # pattern of the file that fills the disk, ranks on which it does, bytes it takes before failing
    "tensor_data_on_one_rank": (r"^__1_0\.distcp$", [1], 600),
    "common_pt_on_rank0": (r"^common\.pt$", [0], 600),
    "rng_state_on_one_rank": (r"^rank_00001\.pt$", [1], 600),
    "checkpoint_description": (r"mile_checkpoint\.json", [0], 100),
    "latest_file_at_commit": (r"latest_checkpointed_iteration\.txt", [0], 0),
}


@pytest.mark.parametrize("case", list(FULL_DISK_CASES))
def test_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(dist_pool, tmp_path, case):
    pattern, ranks, room = FULL_DISK_CASES[case]
    save = tmp_path / "save"
    per_rank = dist_pool(2).run(worker_full_disk_during_save, str(save), pattern, ranks, room, errno.ENOSPC, True,
                                tensor_model_parallel_size=2)
    messages = {message for message, _, _, _ in per_rank}
    assert len(messages) == 1, messages  # every rank stops with the same message
    message = messages.pop()
    assert message is not None and "\n" not in message, message
    assert str(save) in message and "no space left" in message
    previous_size = _size(save / "iter_0000001")
    assert f"{previous_size:,} bytes" in message  # the estimate: the previous checkpoint's size
    assert re.search(r"[\d,]+ bytes .*free", message), message
    assert "Traceback" not in message and "unexpected pos" not in message
    for _, left, latest, loaded in per_rank:
        assert latest == 1
        assert left == ["iter_0000001", "latest_checkpointed_iteration.txt"], left  # no temp, no untracked iter_2
        assert loaded == (1, 2)
    assert checkpointing.read_latest_iteration(save) == 2  # the retry after the disk was freed


def test_full_quota_on_a_first_save_estimates_from_the_state(dist_pool, tmp_path):
    save = tmp_path / "save"
    per_rank = dist_pool(2).run(worker_full_disk_during_save, str(save), r"^__0_0\.distcp$", [0], 600,
                                errno.EDQUOT, False, tensor_model_parallel_size=2)
    message, left, latest, _ = per_rank[0]
    assert {m for m, _, _, _ in per_rank} == {message}
    assert "quota" in message.lower() and "\n" not in message
    assert latest is None and left == []
    # No previous checkpoint: the estimate is the state's tensor bytes, close to what the retried save wrote.
    needed = int(re.search(r"about ([\d,]+) bytes", message).group(1).replace(",", ""))
    actual = _size(save / "iter_0000002")
    assert 0.7 * actual < needed < 1.3 * actual, (needed, actual)


def _failed_write(buffer: io.BytesIO):
    """A write that fails while a view of `buffer` is alive in its frame (as torch's writer does)."""
    view = buffer.getbuffer()  # noqa: F841 - the export the frame keeps
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("wrapped", [False, True], ids=["os_error", "in_torch_checkpoint_exception"])
def test_a_reported_write_failure_releases_its_frames_views(wrapped):
    """CPython 3.12.0/3.12.1 crash when the garbage collector frees a BytesIO export held in an exception's
    frames (write_failure.release_frames): after release_frames the export is gone by reference counting,
    so the buffer can be resized again (it cannot while the export lives)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_mile.checkpointing.write_failure import release_frames

    buffer = io.BytesIO(b"data")
    buffer.seek(0, io.SEEK_END)
    try:
        _failed_write(buffer)
    except OSError as caught:
        error = caught
    if wrapped:  # as torch's writer reports it: the OSError only among the per-rank failures, no cause or context
        error = CheckpointException("save failed", {1: (error, None)})
        assert error.__cause__ is None and error.__context__ is None
    with pytest.raises(BufferError):
        buffer.write(b" more")  # the failed frame still exports the buffer
    release_frames(error)
    buffer.write(b" more")
    assert buffer.getvalue() == b"data more"
