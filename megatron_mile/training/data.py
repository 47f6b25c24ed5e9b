"""Training and validation samples: megatron-core's GPTDataset (or its mock) and a resumable sampler.

Every rank builds the same datasets (rank 0 first, so index caches are written once) and reads the
samples of its data-parallel slice; tensor-parallel peers read identical samples. The order depends only
on the seed and on how many samples were consumed, so a resumed run continues with exactly the samples the
uninterrupted run would have seen, whatever the DP size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_mile.config import RunConfig
from megatron_mile.data.tokenizers import build_tokenizer
from megatron_mile.data import blends, index_cache, splits
from megatron_mile.data.indexed_reader import check_indexed_dataset
from megatron_mile.training.initialize import print_rank_0
from megatron_mile.training.run_control import ignore_signal_in_worker

T = TypeVar("T")


def build_run_tokenizer(config: RunConfig):
    """The tokenizer named by the run's tokenizer flags (megatron_mile.data.tokenizers)."""
    d = config.data
    tokenizer = build_tokenizer(
        d.tokenizer_type,
        tokenizer_model=d.tokenizer_model,
        vocab_file=d.vocab_file,
        merge_file=d.merge_file,
        vocab_size=d.vocab_size,
        tiktoken_pattern=d.tiktoken_pattern,
        tiktoken_num_special_tokens=d.tiktoken_num_special_tokens,
    )
    if not hasattr(tokenizer, "unique_identifiers"):
        # megatron's datasets put this into the description (and hash) of their index caches, so a
        # cache built with one tokenizer is never reused with another.
        tokenizer.unique_identifiers = {
            "class": type(tokenizer).__name__,
            "tokenizer_model": d.tokenizer_model,
            "vocab_file": d.vocab_file,
            "merge_file": d.merge_file,
            "vocab_size": tokenizer.vocab_size,
        }
    return tokenizer


def run_sources(config: RunConfig) -> blends.DataSources:
    """The run's blends: --data-path / --data-args-path, or one per split (--train-data-path, ... or
    --per-split-data-args-path); none with --mock-data. Reads the blend files (checked at start-up)."""
    d = config.data
    return blends.resolve_sources(d.data_path, d.data_args_path, d.train_data_path, d.valid_data_path,
                                  d.test_data_path, d.per_split_data_args_path)


def gpt_dataset_config(config: RunConfig, tokenizer, blend, split: Optional[str] = None,
                       blend_per_split=None) -> GPTDatasetConfig:
    """megatron-core's GPTDatasetConfig for this run's samples (training and evaluation tools alike).

    `split` defaults to the run's --split; with `blend_per_split` ([train, valid, test] blends) there is no
    split (megatron-core refuses both). The document options are Megatron-LM's: --eod-mask-loss zeroes the
    loss mask where the input token is the tokenizer's EOD, --reset-position-ids restarts positions after
    it, --reset-attention-mask makes each sample's [1, s, s] mask block-diagonal causal (True = masked),
    built only with --create-attention-mask-in-dataloader (the default). No collectives.
    """
    d = config.data
    return GPTDatasetConfig(
        random_seed=config.training.seed,
        sequence_length=config.model.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=None if blend_per_split is not None else split if split is not None else d.split,
        tokenizer=tokenizer,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=d.create_attention_mask_in_dataloader,
        path_to_cache=d.data_cache_path,
        mmap_bin_files=d.mmap_bin_files,
        num_dataset_builder_threads=d.num_dataset_builder_threads,
    )


def build_on_rank0_first(build: Callable[[], T]) -> T:
    """build() on rank 0, then on every other rank, so that index caches are written once and read after.

    Collectives: two barriers on the world group (none without torch.distributed).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        built = build()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        built = build()
    if dist.is_initialized():
        dist.barrier()
    return built


def build_datasets(config: RunConfig, tokenizer, num_eval_samples: int):
    """(train, validation) datasets sized for the whole run; validation is None without evaluation.

    Before megatron builds anything, every rank alike checks (so that a refusal never leaves another rank
    waiting in a barrier): each dataset's .bin/.idx (check_dataset_files), that no split the run samples
    from is empty (data.splits: train always, validation when num_eval_samples > 0; the test split of --split
    is never built, a --test-data-path dataset only by build_test_dataset), and, just before megatron opens them, that the index caches are plain arrays
    (data.index_cache).

    Raises:
        FileNotFoundError, IndexedDatasetError, DataSplitError, IndexCacheError: naming the file or flag.

    Collectives: barriers on the world group.
    """
    d, t = config.data, config.training
    needed = _needed_splits(num_eval_samples)
    sizes = [t.train_iters * t.global_batch_size, num_eval_samples, 0]
    sources = run_sources(config)
    prefixes = sources.prefixes()
    if prefixes:
        cache = d.data_cache_path or "<prefix>/cache/ beside each dataset"
        print_rank_0(f" checking {len(prefixes)} dataset(s), then building their "
                     f"{' and '.join(splits.SPLIT_NAMES[i] for i in needed)} sample indices ({sizes[0]:,} training "
                     f"samples; cached in {cache}, reused by later runs with the same data, split, seed and "
                     "sequence length) ...")
        check_data(config, num_eval_samples)
    per_split = None
    if sources.blend_per_split is not None:  # splits the run does not sample from are not built
        per_split = [blend if index in needed else None for index, blend in enumerate(sources.blend_per_split)]
    dataset_config = gpt_dataset_config(config, tokenizer, sources.blend, blend_per_split=per_split)
    if per_split is None:
        dataset_config.split_matrix = splits.only_splits(dataset_config.split_matrix, needed)
    train, valid, _ = _build(config, dataset_config, sizes, prefixes)
    return train, valid


def build_test_dataset(config: RunConfig, tokenizer, num_samples: int):
    """The --test-data-path (or per-split file's "test") dataset of `num_samples` samples, None without one.
    Collectives: barriers on the world group."""
    sources = run_sources(config)
    test = sources.blend_per_split[splits.TEST] if sources.blend_per_split else None
    if test is None or num_samples <= 0:
        return None
    dataset_config = gpt_dataset_config(config, tokenizer, None, blend_per_split=[None, None, test])
    return _build(config, dataset_config, [0, 0, num_samples], test[0])[splits.TEST]


def _build(config: RunConfig, dataset_config: GPTDatasetConfig, sizes: List[int], prefixes: List[str]) -> list:
    """megatron-core's [train, valid, test] datasets of `sizes` samples, built on rank 0 first."""
    dataset_cls = MockGPTDataset if config.data.mock_data else GPTDataset

    def build():
        index_cache.check_index_caches(prefixes, config.data.data_cache_path)
        return BlendedMegatronDatasetBuilder(dataset_cls, sizes, lambda: True, dataset_config).build()

    return build_on_rank0_first(build)


def _needed_splits(num_eval_samples: int) -> list:
    """The splits a run samples from: training always, validation when it evaluates."""
    return [splits.TRAIN, splits.VALID] if num_eval_samples > 0 else [splits.TRAIN]


def check_data(config: RunConfig, num_eval_samples: int) -> None:
    """Validate the --data-path datasets (their .bin/.idx pairs) and that no split the run samples from is
    empty. Cheap (memory-mapped, vectorised): the set-up runs it before any model work, build_datasets again.

    Raises FileNotFoundError, IndexedDatasetError or DataSplitError naming the file or flag. No collectives.
    """
    sources = run_sources(config)
    if sources.blend is not None:
        prefixes = sources.blend[0]
        sequences = check_dataset_files(prefixes)
        splits.check_splits_not_empty(config.data.split, dict(zip(prefixes, sequences)),
                                      _needed_splits(num_eval_samples))
    for blend, flag in zip(sources.blend_per_split or [], blends.PER_SPLIT_FLAGS):
        if blend is not None:  # whole datasets, one per split: none may be empty (megatron would spin forever)
            for prefix, count in zip(blend[0], check_dataset_files(blend[0], flag)):
                if count == 0:
                    raise splits.DataSplitError(f"{flag} {prefix}: the dataset holds no sequence (document)")


def check_dataset_files(prefixes, flag: str = "--data-path") -> List[int]:
    """Validate each dataset prefix's .bin/.idx pair; return the number of sequences of each. No collectives.

    Raises:
        FileNotFoundError: a prefix lacks its .bin or .idx (the message names `flag`).
        IndexedDatasetError: a damaged or mismatched pair (data.indexed_reader; the message names the file).
    """
    return [check_indexed_dataset(prefix, flag).num_sequences for prefix in prefixes]


@dataclass
class MicroBatchSampler:
    """Indices of this DP rank's micro-batches, in Megatron-LM's pretraining order.

    Global batch g holds samples [g * G, (g + 1) * G); inside it, micro-batch round k of DP rank r takes
    samples k * (mbs * DP) + r * mbs + [0, mbs). Resuming = starting at consumed_samples.
    """

    total_samples: int
    consumed_samples: int
    micro_batch_size: int
    data_parallel_rank: int
    data_parallel_size: int

    def __iter__(self) -> Iterator[list]:
        stride = self.micro_batch_size * self.data_parallel_size
        start = self.consumed_samples
        while start + stride <= self.total_samples:
            first = start + self.data_parallel_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += stride


@dataclass
class CyclicMicroBatchSampler:
    """Indices of this DP rank's micro-batches for --dataloader-type cyclic: Megatron-LM's random sampler.

    An epoch is the largest multiple A of mbs * DP samples the dataset holds; epoch e = consumed // A is
    permuted by torch.randperm seeded with e. With data_sharding (Megatron-LM's default) DP rank r permutes
    its own share [r * A/DP, (r + 1) * A/DP) and reads it mbs at a time; without, one permutation of the
    first (len // mbs) * mbs indices is dealt out round-robin, of which the epoch takes A (so that every rank
    reads as many micro-batches). Resuming = starting at consumed_samples (a multiple of mbs * DP). One pass
    yields the rest of the current epoch; `next_epoch_start` is where the next pass starts.
    """

    total_samples: int
    consumed_samples: int
    micro_batch_size: int
    data_parallel_rank: int
    data_parallel_size: int
    data_sharding: bool = True

    @property
    def epoch_samples(self) -> int:
        stride = self.micro_batch_size * self.data_parallel_size
        return self.total_samples - self.total_samples % stride

    @property
    def next_epoch_start(self) -> int:
        return (self.consumed_samples // self.epoch_samples + 1) * self.epoch_samples

    def __iter__(self) -> Iterator[list]:
        mbs, dp, rank = self.micro_batch_size, self.data_parallel_size, self.data_parallel_rank
        active = self.epoch_samples
        if active == 0:
            return
        epoch, offset = divmod(self.consumed_samples, active)
        generator = torch.Generator().manual_seed(epoch)
        if self.data_sharding:
            share = active // dp
            order = (torch.randperm(share, generator=generator)[offset // dp:] + rank * share).tolist()
        else:
            permutation = torch.randperm((self.total_samples // mbs) * mbs, generator=generator)
            order = permutation[offset:active][rank::dp].tolist()
        for first in range(0, len(order) - mbs + 1, mbs):
            yield order[first:first + mbs]


def collate(samples) -> dict:
    """Stack dataset samples into a micro-batch: tokens, labels, loss_mask, position_ids, each [mbs, seq], and
    attention_mask [mbs, 1, seq, seq] (bool, True = masked) when the dataset builds one."""
    keys = ("tokens", "labels", "loss_mask", "position_ids") + (("attention_mask",) if "attention_mask" in samples[0] else ())
    return {key: torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples]) for key in keys}


def micro_batch_iterator(dataset, config: RunConfig, consumed_samples: int, cycle: bool = False) -> Iterator[dict]:
    """Micro-batches (dicts of [mbs, seq] tensors) for this DP rank, starting after consumed_samples.

    `cycle` restarts from the beginning when the dataset is exhausted (validation reuses its samples).
    --dataloader-type single reads in MicroBatchSampler's order; cyclic in CyclicMicroBatchSampler's, epoch
    after epoch whatever `cycle` says (as Megatron-LM cycles its loader).
    With --num-workers N > 0, as Megatron-LM, a torch DataLoader reads and collates the samples in N worker
    processes, in the same order as without workers.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    workers = config.data.num_workers
    cyclic = config.data.dataloader_type == "cyclic"
    while True:
        if cyclic:
            sampler = CyclicMicroBatchSampler(len(dataset), consumed_samples, config.training.micro_batch_size,
                                              dp_rank, dp_size, config.data.data_sharding)
        else:
            sampler = MicroBatchSampler(len(dataset), consumed_samples, config.training.micro_batch_size, dp_rank,
                                        dp_size)
        if workers > 0:
            t = config.training
            init = (functools.partial(ignore_signal_in_worker, t.exit_signal)
                    if t.exit_signal_handler else None)
            # Its own generator: a DataLoader with workers otherwise draws its base seed from torch's global
            # RNG, which moves the dropout streams and makes a run depend on --num-workers.
            generator = torch.Generator().manual_seed(config.training.seed)
            batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                                       num_workers=workers, worker_init_fn=init, generator=generator))
        else:
            batches = (collate([dataset[i] for i in indices]) for indices in sampler)
        produced = False
        for batch in batches:
            produced = True
            yield batch
        if not produced or not (cycle or cyclic):
            return
        consumed_samples = sampler.next_epoch_start if cyclic else 0
