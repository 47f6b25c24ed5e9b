"""Data-loader flags with Megatron-LM's meaning: --num-workers reads samples in that many worker processes
(in the order the single-process reader gives), --no-mmap-bin-files reaches megatron's dataset config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_mile.arguments import parse_args
from megatron_mile.training.data import build_run_tokenizer, gpt_dataset_config, micro_batch_iterator
from tiny_model import TINY_LLAMA


class WorkerStampedSamples(torch.utils.data.Dataset):
    """Sample i: tokens all i, labels the id of the DataLoader worker that read it (-1 in the main process)."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        info = torch.utils.data.get_worker_info()
        worker = -1 if info is None else info.id
        return {"tokens": np.full(4, index), "labels": np.full(4, worker), "loss_mask": np.ones(4),
                "position_ids": np.arange(4)}


@pytest.fixture(autouse=True)
def one_data_parallel_rank(monkeypatch):
    """Read as the only data-parallel rank, without a process group (the pool's workers are daemonic
    processes, which cannot start DataLoader workers)."""
    from megatron_mile.training import data

    monkeypatch.setattr(data.parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(data.parallel_state, "get_data_parallel_world_size", lambda: 1)


def read(num_workers, consumed=0):
    config = parse_args(TINY_LLAMA + ["--num-workers", str(num_workers)], world_size=1)
    return list(micro_batch_iterator(WorkerStampedSamples(), config, consumed))


def test_num_workers_reads_in_worker_processes_in_the_same_order():
    alone, pooled = read(0), read(2)
    assert [b["tokens"][:, 0].tolist() for b in alone] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert [b["tokens"].tolist() for b in pooled] == [b["tokens"].tolist() for b in alone]
    assert {int(b["labels"][0, 0]) for b in alone} == {-1}
    assert {int(b["labels"][0, 0]) for b in pooled} == {0, 1}  # both workers read
    # Resuming after consumed samples starts at the same place with workers.
    assert [b["tokens"][:, 0].tolist() for b in read(2, consumed=8)] == [[8, 9], [10, 11]]


def test_no_mmap_bin_files_reaches_megatrons_dataset_config():
    default = parse_args(TINY_LLAMA, world_size=1)
    off = parse_args(TINY_LLAMA + ["--no-mmap-bin-files"], world_size=1)
    tokenizer = build_run_tokenizer(default)
    assert gpt_dataset_config(default, tokenizer, None).mmap_bin_files is True
    assert gpt_dataset_config(off, tokenizer, None).mmap_bin_files is False


def test_workers_leave_the_global_random_streams_alone():
    """Dropout draws from torch's global generator: a run must not depend on --num-workers."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    config = parse_args(TINY_LLAMA + ["--num-workers", "2"], world_size=1)
    next(iter(micro_batch_iterator(WorkerStampedSamples(), config, 0)))
    assert torch.equal(torch.rand(3), expected)


class SignalDispositionSamples(WorkerStampedSamples):
    """labels: 1 where SIGTERM is ignored in the process that read the sample."""

    def __getitem__(self, index):
        import signal

        sample = super().__getitem__(index)
        sample["labels"] = np.full(4, int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN))
        return sample


@pytest.mark.parametrize("handler, ignored", [([], 0), (["--exit-signal-handler"], 1)])
def test_workers_ignore_the_exit_signal_under_the_handler(handler, ignored):
    """A SIGTERM sent to the process group must not kill the loader's workers while the main process saves."""
    config = parse_args(TINY_LLAMA + ["--num-workers", "2", *handler], world_size=1)
    batches = list(micro_batch_iterator(SignalDispositionSamples(), config, 0))
    assert {int(b["labels"][0, 0]) for b in batches} == {ignored}
