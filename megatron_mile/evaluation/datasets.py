"""Which tokens the frequency buckets are counted on, and which validation samples each domain is scored on.

Two sources of validation data:

- the validation split of the training prefixes (default): the sequences megatron-core's dataset builder
  put into the validation split of each --data-path prefix under the run's --split, i.e. exactly the
  documents training never saw;
- held-out datasets (--valid-data-path): every sequence of each prefix.

Each prefix is one domain (tools/preprocess_data.py --split-by-domain writes one per Pile domain), scored
on its own single-epoch GPTDataset: every token of its documents is a target exactly once, except the
first token and the tail that does not fill a whole sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_mile.config import RunConfig
from megatron_mile.data import index_cache, splits
from megatron_mile.data.pile import domain_of_prefix
from megatron_mile.evaluation.token_buckets import SequenceRange, num_sequences, split_sequence_range
from megatron_mile.training import data as run_data

TRAIN_SPLIT, VALID_SPLIT = splits.TRAIN, splits.VALID
# The split string that makes a whole dataset its validation split (megatron's builder selects all of it).
_WHOLE_AS_VALIDATION = "0,1,0"


@dataclass
class EvalDomain:
    """One validation dataset: its domain name, the sequences scored, and megatron's dataset over them."""

    name: str
    sequences: SequenceRange
    split: str  # the split string the dataset was built with (it names megatron's index cache)
    dataset: Optional[object] = None  # GPTDataset, None when the range is too short for one sample

    @property
    def num_samples(self) -> int:
        return 0 if self.dataset is None else len(self.dataset)


def prefixes_of(data_path: Sequence[str]) -> List[str]:
    """The dataset prefixes of a --data-path list, with or without blend weights ('w1 p1 w2 p2 ...')."""
    prefixes, _ = splits.parse_blend(list(data_path))
    return prefixes


def training_ranges(prefixes: Sequence[str], split: str) -> List[SequenceRange]:
    """The training split's sequences of every prefix (what the buckets are counted on). No collectives."""
    matrix = splits.split_matrix(split)
    return [split_sequence_range(p, num_sequences(p), matrix, TRAIN_SPLIT) for p in prefixes]


def domain_names(prefixes: Sequence[str]) -> List[str]:
    """A distinct display name per prefix: its Pile domain, else its file name (numbered if repeated)."""
    names: List[str] = []
    seen: Dict[str, int] = {}
    for prefix in prefixes:
        name = domain_of_prefix(prefix)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return names


def validation_domains(prefixes: Sequence[str], split: Optional[str]) -> List[EvalDomain]:
    """One EvalDomain per prefix: its validation split under `split`, or all of it when split is None.

    No collectives; the datasets are built by build_validation_datasets.
    """
    domains = []
    for name, prefix in zip(domain_names(prefixes), prefixes):
        used_split = split if split is not None else _WHOLE_AS_VALIDATION
        seq_range = split_sequence_range(prefix, num_sequences(prefix), splits.split_matrix(used_split), VALID_SPLIT)
        domains.append(EvalDomain(name, seq_range, used_split))
    return domains


def _sequence_tokens(seq_range: SequenceRange) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # Keep the dataset referenced while its arrays are read: they are views of its memory map, which
    # its destructor closes.
    dataset = IndexedDataset(seq_range.prefix, multimodal=False, mmap=True)
    tokens = int(dataset.index.sequence_lengths[seq_range.begin:seq_range.end].sum(dtype=np.int64))
    del dataset
    return tokens


def build_validation_datasets(config: RunConfig, tokenizer, domains: List[EvalDomain]) -> None:
    """Fill each domain's single-epoch GPTDataset (samples of --seq-length + 1 tokens), in place.

    A range with fewer than seq_length + 1 tokens cannot make a sample: its dataset stays None (the domain
    is reported with 0 tokens). Collectives: two barriers on the world group per domain (rank 0 writes
    megatron's index cache first, the others read it).
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.utils import Split

    for domain in domains:
        seq_range = domain.sequences
        if seq_range.end <= seq_range.begin or _sequence_tokens(seq_range) < config.model.seq_length + 1:
            continue
        dataset_config = run_data.gpt_dataset_config(config, tokenizer, ([seq_range.prefix], None), split=domain.split)

        def build(seq_range=seq_range, dataset_config=dataset_config):
            index_cache.check_index_caches([seq_range.prefix], config.data.data_cache_path)
            low_level = GPTDataset.build_low_level_dataset(seq_range.prefix, dataset_config)
            indices = np.arange(seq_range.begin, seq_range.end, dtype=np.int32)
            # num_samples=None: exactly one epoch over the range, every token once.
            return GPTDataset(low_level, seq_range.prefix, indices, None, Split.valid, dataset_config)

        domain.dataset = run_data.build_on_rank0_first(build)
