"""A checkpoint is data a user hands us: every pickled file in it is read without running code, and a file
that is tampered with or damaged is refused with one line naming it, never with torch's advice to load it
with weights_only=False.

Workers run in spawned gloo processes (tests/conftest.py: dist_pool).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from checkpoint_cases import build, make_config, run_step

from megatron_mile import checkpointing
from megatron_mile.checkpointing import safe_load


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): the marker directory exists only if code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def worker_save(directory):
    from megatron_mile.arguments import config_to_dict

    config = make_config(dropout=0.0)
    model, optimizer, scheduler = build(config)
    run_step(model, optimizer, scheduler, 1)
    checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 2, config_to_dict(config))


def worker_load(directory):
    """The message load_checkpoint refuses with, on this rank; None when it loaded."""
    from megatron_mile.arguments import config_to_dict

    config = make_config(dropout=0.0)
    model, optimizer, scheduler = build(config)
    try:
        checkpointing.load_checkpoint(directory, model, optimizer, scheduler, config_to_dict(config))
    except checkpointing.CheckpointError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def saved(dist_pool, tmp_path_factory):
    """A pristine checkpoint of 2 TP ranks (each test tampers a copy)."""
    directory = tmp_path_factory.mktemp("pristine")
    dist_pool(2).run(worker_save, str(directory), tensor_model_parallel_size=2)
    return directory


def _copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def _malicious_torch_file(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state": _RunsCode(str(marker))}, buffer)
    return buffer.getvalue()


def _assert_one_line_refusal(messages, path: Path, marker: Path):
    assert not marker.exists(), "unpickling ran code"
    refusals = [m for m in messages if m is not None]
    assert refusals, "the tampered checkpoint loaded"
    for message in refusals:
        assert "\n" not in message, message
        assert str(path) in message, message
        assert "weights_only" not in message.replace(str(path), ""), message  # no advice to load unsafely


@pytest.mark.parametrize("name", ["common.pt", "rng/rank_00000.pt", "rng/rank_00001.pt", ".metadata"])
def test_tampered_pickle_is_refused_in_one_line(dist_pool, saved, tmp_path, name):
    directory = _copy(saved, tmp_path / "ckpt")
    marker = tmp_path / "code_ran"
    target = directory / "iter_0000001" / name
    if name == ".metadata":
        target.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    else:
        target.write_bytes(_malicious_torch_file(marker))
    messages = dist_pool(2).run(worker_load, str(directory), tensor_model_parallel_size=2)
    _assert_one_line_refusal(messages, target, marker)
    for message in messages:
        if message is not None:
            assert "mkdir" in message, message  # what was refused
    # Every rank stops: the one that read the file and its peers alike.
    assert all(m is not None for m in messages), messages


@pytest.mark.parametrize("name", ["common.pt", "rng/rank_00000.pt"])
def test_truncated_file_is_refused_in_one_line(dist_pool, saved, tmp_path, name):
    directory = _copy(saved, tmp_path / "ckpt")
    target = directory / "iter_0000001" / name
    target.write_bytes(target.read_bytes()[:100])
    messages = dist_pool(2).run(worker_load, str(directory), tensor_model_parallel_size=2)
    _assert_one_line_refusal(messages, target, tmp_path / "never")
    assert all(m is not None for m in messages), messages


def test_tampered_tensor_data_is_refused_in_one_line(dist_pool, saved, tmp_path):
    directory = _copy(saved, tmp_path / "ckpt")
    marker = tmp_path / "code_ran"
    target = directory / "iter_0000001" / "__0_0.distcp"
    data = _malicious_torch_file(marker)
    target.write_bytes(data + target.read_bytes()[len(data):])
    messages = dist_pool(2).run(worker_load, str(directory), tensor_model_parallel_size=2)
    _assert_one_line_refusal(messages, target, marker)
    assert all(m is not None for m in messages), messages


# The reader itself, without processes.


def test_load_weights_only_names_the_file_and_the_refused_global(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "state.pt"
    path.write_bytes(_malicious_torch_file(marker))
    with pytest.raises(checkpointing.CheckpointError) as raised:
        safe_load.load_weights_only(path)
    message = str(raised.value)
    assert not marker.exists()
    assert str(path) in message and "mkdir" in message and "\n" not in message
    assert "weights_only" not in message.replace(str(path), "")


def test_load_weights_only_reads_tensors_and_plain_data(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"x": torch.arange(3), "n": (1, "a", 2.5)}, path)
    loaded = safe_load.load_weights_only(path)
    assert torch.equal(loaded["x"], torch.arange(3)) and loaded["n"] == (1, "a", 2.5)


def test_metadata_unpickler_error_names_the_file(tmp_path):
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(_RunsCode(str(tmp_path / "code_ran"))))
    with pytest.raises(checkpointing.CheckpointError) as raised:
        safe_load.load_checkpoint_metadata(path)
    assert str(path) in str(raised.value) and "mkdir" in str(raised.value)
    assert not (tmp_path / "code_ran").exists()
