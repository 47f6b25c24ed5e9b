"""megatron-core's torch_dist checkpoint strategies and load entry point, the same on every supported release.

- `TorchDistSaveStrategy` / `TorchDistLoadStrategy`: megatron-core's public torch_dist strategies, the base
  classes of the project's in-process writer and safe reader (megatron_mile.checkpointing.torch_dist). The
  save strategy is the one type 0.19's ``dist_checkpointing.save`` accepts (it replaces any other strategy
  with its default); in 0.16.1 it derives from ``strategies.base``, a module deleted in 0.19.
- `load_torch_dist`: ``dist_checkpointing.load`` with the caller's reader of the common state.

What differs between the releases (see the package docstring for the table): 0.16.1 takes a common-load
strategy, so its public ``load`` is called with one that delegates to the caller's reader. 0.17 removed
``TorchCommonLoadStrategy`` and 0.19's ``load`` reads the common state itself (plain ``torch.load``, whatever
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says): there, the same steps its ``load`` performs are composed from
megatron-core's public checkpoint helpers, with the caller's reader in place of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException, check_is_distributed_checkpoint
from megatron.core.dist_checkpointing.dict_utils import merge
from megatron.core.dist_checkpointing.mapping import apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    TorchDistLoadShardedStrategy as TorchDistLoadStrategy,
    TorchDistSaveShardedStrategy as TorchDistSaveStrategy,
)
from megatron.core.dist_checkpointing.utils import extract_sharded_base, force_all_tensors_to_non_fp8
from megatron.core.dist_checkpointing.validation import (
    StrictHandling,
    determine_global_metadata,
    validate_integrity_and_strict_load,
)

from megatron_mile.megatron_core_api import HAS_COMMON_LOAD_STRATEGY

# A reader of a checkpoint's common state (common.pt, or 0.17+'s common_state object): checkpoint directory
# -> its (non-sharded) state dict.
CommonReader = Callable[[Path], dict]

__all__ = ["CommonReader", "TorchDistLoadStrategy", "TorchDistSaveStrategy", "load_torch_dist"]


def load_torch_dist(state: dict, checkpoint_dir: Path, sharded_strategy: TorchDistLoadStrategy,
                    read_common: CommonReader) -> dict:
    """Load `checkpoint_dir` (torch_dist format) into the shapes `state` describes, as
    ``dist_checkpointing.load(state, checkpoint_dir, sharded_strategy)`` does, with the common state read by
    `read_common` only. Returns the loaded state dict (common items merged with the loaded shards).

    Raises what megatron's load raises (KeyError, CheckpointingException for a missing or mis-shaped key,
    torch's CheckpointException from the reader) and whatever `read_common` raises. Collectives: megatron's
    access-integrity validation (all-gathers of shard metadata over the default group) and those of
    `sharded_strategy.load`.
    """
    if HAS_COMMON_LOAD_STRATEGY:
        return dist_checkpointing.load(state, str(checkpoint_dir), sharded_strategy=sharded_strategy,
                                       common_strategy=_common_strategy(read_common))
    return _load_with_common_reader(state, Path(checkpoint_dir), sharded_strategy, read_common)


def _common_strategy(read_common: CommonReader):
    """0.16.1: a TorchCommonLoadStrategy whose common state is what `read_common` returns (and nothing else)."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy  # noqa: PLC0415

    class _CommonReaderStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return read_common(Path(checkpoint_dir))

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            # The torch_dist strategy reads sharded objects from its own files; none are stored apart.
            raise NotImplementedError("sharded objects are read by the torch_dist strategy")

    return _CommonReaderStrategy()


def _load_with_common_reader(state: dict, checkpoint_dir: Path, sharded_strategy: TorchDistLoadStrategy,
                             read_common: CommonReader) -> dict:
    """0.17+: megatron's load steps (validation, non-persistent items, factories) around `read_common`.

    The same sequence as megatron-core 0.19's ``serialization.load`` with its default strictness
    (ASSUME_OK_UNEXPECTED) and access-integrity validation; only the common part's reader differs.
    """
    if not (checkpoint_dir.is_dir() and check_is_distributed_checkpoint(str(checkpoint_dir))):
        raise CheckpointingException(f"{checkpoint_dir} is not a distributed checkpoint")
    force_all_tensors_to_non_fp8(state)
    state, nonpersistent, factories = load_preprocess(state)
    common = read_common(checkpoint_dir)
    merge(common, nonpersistent)
    state, _ = extract_sharded_base(state)
    local_metadata, global_metadata = determine_global_metadata(state)
    state, _, _ = validate_integrity_and_strict_load(
        state, StrictHandling.ASSUME_OK_UNEXPECTED, True, local_metadata, global_metadata, None
    )
    merge(common, sharded_strategy.load(state, checkpoint_dir))
    return apply_factory_merges(common, factories)
