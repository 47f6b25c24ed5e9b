"""load_checkpoint (resume training), read_training_progress (the counters a resume continues) and
load_model_weights (evaluation, export), for this project's checkpoints and Megatron-LM's alike.

The model may use another TP/PP/VPP/DP layout than the saved one: torch_dist keeps every tensor with its
global shape and offset. The per-rank RNG states load only at the saved layout (Megatron-LM's rng_state at
the saved TP/PP sizes; skipped with a note otherwise), and the distributed optimizer's state only at the
saved TP/PP/VPP sizes (any DP size; a clear error otherwise, the weights still load with
load_optimizer=False); the plain optimizer's state at any layout. The padded vocabulary size must match (it
is a multiple of --make-vocab-size-divisible-by times TP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from megatron_mile.checkpointing import torch_dist
from megatron_mile.checkpointing.collectives import barrier
from megatron_mile.checkpointing.compatibility import (
    CheckpointError,
    check_model_config,
    check_optimizer_compatible,
    check_vocab,
    optimizer_format,
    parallel_layout,
    vocab_sizes,
)
from megatron_mile.checkpointing.rng import (
    RNG_STATE_KEY,
    load_rng_state,
    restore_megatron_lm_rng_states,
    rng_state_object,
)
from megatron_mile.checkpointing.scheduler import (
    check_schedule,
    flag_group_values,
    reapply_flag_group_values,
    restore_scheduler,
    scheduler_policy,
)
from megatron_mile.checkpointing import megatron_lm
from megatron_mile.checkpointing.tracker import (
    RELEASE,
    TRACKER_FILENAME,
    read_metadata,
    resolve_checkpoint_dir,
    written_by_megatron_lm,
)
from megatron_mile.megatron_core_api.optimizer import load_optimizer_state, restore_saved_group_values
from megatron_mile.training.initialize import print_rank_0
from megatron_mile.training.optimizer import (
    init_empty_distributed_optimizer_state,
    restore_distributed_optimizer_step,
    use_fused_torch_adam_on_cpu,
)


def _load_sharded(checkpoint_dir: Path, state: dict) -> dict:
    """Collectives: those of torch_dist.load_sharded."""
    try:
        return torch_dist.load_sharded(state, checkpoint_dir)
    except torch_dist.LOAD_ERRORS as error:
        refused = torch_dist.refused_file(error)
        if refused is not None:  # a damaged or tampered file: one line names the checkpoint and the file
            raise CheckpointError(f"cannot load {checkpoint_dir}: {refused}") from None
        raise CheckpointError(
            f"cannot load {checkpoint_dir} into this model: {torch_dist.describe_load_error(error)}"
        ) from error


def _load_chunks(model: list, loaded: dict) -> None:
    for index, chunk in enumerate(model):
        torch_dist.unwrap_model(chunk).load_state_dict(loaded[f"model{index}"], strict=True)


def load_checkpoint(load_dir, model: list, optimizer, scheduler, config_dict: dict, load_optimizer: bool = True,
                    load_rng: bool = True, iteration: Optional[int] = None) -> Tuple[int, int]:
    """Load the latest checkpoint (or `iteration`) of `load_dir` into model, optimizer and scheduler.

    Returns (iteration, consumed_samples); (0, 0) with a printed note when `load_dir` has no checkpoint.
    Must be called on every rank. The model may use another TP/PP/VPP/DP layout than the saved one; RNG
    states are restored only at the saved layout (a note is printed otherwise). Raises FileNotFoundError /
    ValueError (CheckpointError) naming the path and the fix for a missing directory or iteration, a
    corrupt latest file, or a model whose architecture or vocabulary differs from the checkpoint's.

    A checkpoint Megatron-LM wrote resumes the same way, from its common state (args, iteration, scheduler) and
    its sharded model, optimizer and ``rng_state`` (restored at the same TP/PP sizes, as Megatron-LM does);
    optimizer states that do not fit are refused with megatron_lm.check_optimizer's advice.

    Collectives: those of megatron's dist_checkpointing.load (all-gathers of shard metadata for
    validation; torch.distributed.checkpoint.load's plan gather/scatter); the distributed optimizer's scatter
    of its state when it is used; an all_gather_object agreeing on the RNG files; one final barrier. A
    refused or damaged file raises CheckpointError on every rank, one line naming the file.
    """
    checkpoint_dir, iteration = resolve_checkpoint_dir(load_dir, iteration, megatron_lm=True)
    if checkpoint_dir is None:
        print_rank_0(f" no checkpoint in {load_dir} ({TRACKER_FILENAME} not found): training from scratch")
        return 0, 0
    common = megatron_lm.read_common(checkpoint_dir) if written_by_megatron_lm(checkpoint_dir) else None
    # How messages name the checkpoint: its path, and for Megatron-LM's what it is.
    what = f"{checkpoint_dir} ({megatron_lm.describe(common)})" if common is not None else str(checkpoint_dir)
    if checkpoint_dir.name == RELEASE:
        # As Megatron-LM: a release checkpoint (a converter's output) is weights to start from, never resumed.
        raise CheckpointError(f"{what} is Megatron-LM's '{RELEASE}' checkpoint: weights only, nothing to resume; "
                              "start from it with --finetune (or --pretrained-checkpoint)")
    if common is not None:
        megatron_lm.check_model_args(common, config_dict, vocab_sizes(model)["padded"], checkpoint_dir)
        metadata = megatron_lm.resume_description(common, torch_dist.stored_keys(checkpoint_dir))
    else:
        metadata = read_metadata(checkpoint_dir)
        check_model_config(metadata.get("config", {}), config_dict, checkpoint_dir)
        check_vocab(metadata.get("vocab", {}), model, checkpoint_dir)
    load_optimizer = load_optimizer and optimizer is not None
    policy = scheduler_policy(config_dict)
    if load_optimizer and not metadata.get("has_optimizer", False):
        raise CheckpointError(f"{what} holds no optimizer state (saved with --no-save-optim): load it "
                              "with --no-load-optim (load_optimizer=False)")

    if load_optimizer:
        if common is not None:
            megatron_lm.check_optimizer(common, config_dict, optimizer_format(optimizer), checkpoint_dir)
        check_optimizer_compatible(metadata, optimizer, what)
        if scheduler is not None and metadata.get("scheduler") is not None:  # before any tensor is read
            check_schedule(scheduler, metadata["scheduler"], policy, what,
                           metadata.get("config", {}).get("optimizer"), config_dict.get("optimizer"))
        own_group_values = flag_group_values(optimizer)
        init_empty_distributed_optimizer_state(optimizer)
    state = torch_dist.sharded_state_dict(model, optimizer if load_optimizer else None, is_loading=True)
    rng_in_shards = common is not None and load_rng and metadata["has_rng"] and _same_tp_pp(metadata, what)
    if rng_in_shards:
        state[RNG_STATE_KEY] = rng_state_object()
    if common is not None:  # Megatron-LM stores a single model chunk under 'model'
        loaded = megatron_lm.rename_chunks(_load_sharded(checkpoint_dir, megatron_lm.rename_chunks(state)), back=True)
    else:
        loaded = _load_sharded(checkpoint_dir, state)
    _load_chunks(model, loaded)
    if load_optimizer:
        # megatron's distributed-optimizer load copies into its fp32 main parameters (leaves that
        # require grad) outside no_grad on some paths; the copy is a state restore, not a computation.
        with torch.no_grad():
            saved_group_values = load_optimizer_state(optimizer, loaded["optimizer"])
        restore_distributed_optimizer_step(optimizer)
        use_fused_torch_adam_on_cpu(optimizer)  # the loaded param groups carry the saving run's kernel flags
        restore_saved_group_values(optimizer, saved_group_values)  # the checkpoint's, as a positional load
        reapply_flag_group_values(optimizer, own_group_values, policy)
        if scheduler is not None and metadata.get("scheduler") is not None:
            restore_scheduler(scheduler, metadata["scheduler"], policy, what)

    if load_rng and not metadata.get("has_rng", True):
        print_rank_0(f" note: {what} was saved without RNG states (--no-save-rng): the run continues "
                     "with freshly seeded ones")
    elif rng_in_shards:
        note = restore_megatron_lm_rng_states(loaded[RNG_STATE_KEY], metadata["data_parallel_random_init"])
        if note is not None:
            print_rank_0(f" note: {what}: {note}")
    elif load_rng and common is None:
        _load_rng(checkpoint_dir, metadata)
    barrier()
    print_rank_0(f" loaded checkpoint {what} (iteration {iteration}, "
                 f"{metadata['consumed_samples']} samples consumed)")
    return int(metadata["iteration"]), int(metadata["consumed_samples"])


def _same_tp_pp(metadata: dict, what: str) -> bool:
    """Whether Megatron-LM's rng_state (one entry per PP and TP rank) can be restored at this run's TP/PP
    sizes; prints a note when not (as Megatron-LM, the run then keeps its freshly seeded states)."""
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    saved, current = [metadata["layout"][k] for k in keys], [parallel_layout()[k] for k in keys]
    if saved != current:
        print_rank_0(f" note: {what}; this run uses TP {current[0]}, PP {current[1]}: its RNG states are not "
                     "restored (dropout masks will differ from an uninterrupted run)")
    return saved == current


def read_training_progress(load_dir, iteration: Optional[int] = None) -> dict:
    """The counters a resume continues from the checkpoint load_checkpoint loads (latest, or `iteration`):
    {'iteration', 'consumed_samples', 'consumed_valid_samples', 'num_floating_point_operations_so_far'},
    for this project's checkpoints (mile_checkpoint.json; the last two 0 where older ones lack them) and for
    Megatron-LM's (its common state). Raises FileNotFoundError when `load_dir` holds no checkpoint. No
    collectives."""
    checkpoint_dir, iteration = resolve_checkpoint_dir(load_dir, iteration, megatron_lm=True)
    if checkpoint_dir is None:
        raise FileNotFoundError(f"{load_dir} holds no checkpoint (no {TRACKER_FILENAME})")
    if written_by_megatron_lm(checkpoint_dir):
        metadata = megatron_lm.resume_description(megatron_lm.read_common(checkpoint_dir), set())
    else:
        metadata = read_metadata(checkpoint_dir)
    keys = ("iteration", "consumed_samples", "consumed_valid_samples", "num_floating_point_operations_so_far")
    return {key: int(metadata.get(key, 0)) for key in keys}


def _load_rng(checkpoint_dir: Path, metadata: dict) -> None:
    saved_layout, current_layout = metadata.get("layout", {}), parallel_layout()
    if saved_layout != current_layout:
        # Per-rank streams do not map between layouts; the run continues with its freshly seeded ones.
        print_rank_0(f" note: {checkpoint_dir} was saved at layout {saved_layout}, this run uses {current_layout}; "
                     "RNG states are not restored (dropout masks will differ from an uninterrupted run)")
        return
    load_rng_state(checkpoint_dir)


def load_model_weights(load_dir, model: list, iteration: Optional[int] = None,
                       config_dict: Optional[dict] = None) -> int:
    """Load only the model weights (latest, or `iteration`) into `model`; returns the iteration.

    For evaluation and export tools: no optimizer, scheduler or RNG state is touched. With `config_dict`
    the architecture is checked as in load_checkpoint. Must be called on every rank of the model's layout.

    Collectives: those of megatron's dist_checkpointing.load; one barrier.
    """
    checkpoint_dir, iteration = resolve_checkpoint_dir(load_dir, iteration, megatron_lm=True)
    if checkpoint_dir is None:
        raise FileNotFoundError(f"{load_dir} holds no checkpoint (no {TRACKER_FILENAME})")
    state = torch_dist.sharded_state_dict(model)
    if written_by_megatron_lm(checkpoint_dir):
        # Written by Megatron-LM: its args describe the model; one chunk is stored under 'model'.
        common = megatron_lm.read_common(checkpoint_dir)
        if config_dict is not None:
            megatron_lm.check_model_args(common, config_dict, vocab_sizes(model)["padded"], checkpoint_dir)
        state = megatron_lm.rename_chunks(state)
        _load_chunks(model, megatron_lm.rename_chunks(_load_sharded(checkpoint_dir, state), back=True))
        barrier()
        return int(iteration)
    metadata = read_metadata(checkpoint_dir)
    if config_dict is not None:
        check_model_config(metadata.get("config", {}), config_dict, checkpoint_dir)
    check_vocab(metadata.get("vocab", {}), model, checkpoint_dir)
    _load_chunks(model, _load_sharded(checkpoint_dir, state))
    barrier()
    return int(iteration)
