"""Whether a checkpoint fits this run: architecture, vocabulary, optimizer state format and layout.

Each check raises CheckpointError with the checkpoint's path, what differs and what to do about it,
before any tensor is read. The descriptions of the current run (parallel_layout, vocab_sizes,
optimizer_format) are also what a save records, so that save and load compare like with like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mile.checkpointing.errors import CheckpointError
from megatron_mile.checkpointing.torch_dist import DISTRIBUTED_OPTIMIZER_SHARDING, unwrap_model

__all__ = [
    "ARCHITECTURE_FIELDS", "CheckpointError", "check_model_config", "check_optimizer_compatible", "check_vocab",
    "describe_layout", "optimizer_format", "parallel_layout", "vocab_sizes",
]

# Model settings that change the parameters' shapes or what they compute: a checkpoint only loads into a
# model that agrees on all of them. Dropout, init std, sequence length (rope) and the vocabulary-padding
# multiple may differ (the padded vocabulary size itself is compared separately).
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "group_query_attention",
    "num_query_groups",
    "normalization",
    "norm_epsilon",
    "swiglu",
    "disable_bias_linear",
    "position_embedding_type",
    "rotary_base",
    "untie_embeddings_and_output_weights",
)

# The parallel sizes the distributed optimizer's dp_reshardable state is tied to (DP may change).
_OPTIMIZER_LAYOUT_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
)


def parallel_layout() -> dict:
    """This run's TP/PP/VPP/DP sizes and world size (megatron's parallel state must be initialised)."""
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def describe_layout(layout: dict) -> str:
    return (f"TP={layout['tensor_model_parallel_size']}, PP={layout['pipeline_model_parallel_size']}, "
            f"VPP={layout['virtual_pipeline_model_parallel_size'] or 1}")


def vocab_sizes(model: list) -> dict:
    """{'padded': rows of the embedding, 'real': tokens of the tokenizer} of the model's first chunk."""
    chunk = unwrap_model(model[0])
    return {"padded": int(getattr(chunk, "vocab_size", -1)), "real": int(getattr(chunk, "real_vocab_size", -1))}


def optimizer_format(optimizer) -> Optional[str]:
    """'distributed/<sharding type>' for megatron's distributed optimizer, 'standard' otherwise."""
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: PLC0415

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if any(isinstance(sub, DistributedOptimizer) for sub in subs):
        return f"distributed/{DISTRIBUTED_OPTIMIZER_SHARDING}"
    return "standard"


def check_model_config(saved: dict, current: dict, checkpoint_dir: Path) -> None:
    """The saved run config's architecture fields (ARCHITECTURE_FIELDS) must equal this run's."""
    saved_model, current_model = saved.get("model", {}), current.get("model", {})
    differing = [
        f"{name}: checkpoint {saved_model.get(name)!r}, this run {current_model.get(name)!r}"
        for name in ARCHITECTURE_FIELDS
        if saved_model.get(name) != current_model.get(name)
    ]
    # Learned position embeddings have one row per position: their count must match too.
    if current_model.get("position_embedding_type") == "learned_absolute" and \
            saved_model.get("max_position_embeddings") != current_model.get("max_position_embeddings"):
        differing.append(
            f"max_position_embeddings: checkpoint {saved_model.get('max_position_embeddings')!r}, this run "
            f"{current_model.get('max_position_embeddings')!r}"
        )
    if differing:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} was saved from a different model:\n  - "
            + "\n  - ".join(differing)
            + "\nUse the checkpoint's model flags (megatron_mile.checkpointing.read_saved_config "
            "shows them) or load another checkpoint"
        )


def check_vocab(saved: dict, model: list, checkpoint_dir: Path) -> None:
    """The tokenizer's size and the padded vocabulary size must equal the saved ones."""
    current = vocab_sizes(model)
    saved_padded, saved_real = saved.get("padded"), saved.get("real")
    if saved_real != current["real"]:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} was saved with a {saved_real}-token vocabulary, this run's "
            f"tokenizer has {current['real']}: use the tokenizer the checkpoint was trained with"
        )
    if saved_padded != current["padded"]:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} pads the vocabulary to {saved_padded} rows, this run to "
            f"{current['padded']} (padding is a multiple of --make-vocab-size-divisible-by times the TP "
            f"size): choose --make-vocab-size-divisible-by so that {current['real']} tokens pad to "
            f"{saved_padded} at this TP size"
        )


def check_optimizer_compatible(metadata: dict, optimizer, checkpoint_dir: Path) -> None:
    """The optimizer state formats must match; the distributed optimizer's (dp_reshardable: one tensor
    per gradient bucket) loads only at the saved TP/PP/VPP layout, the DP size may change."""
    saved, current = metadata.get("optimizer_format"), optimizer_format(optimizer)
    if saved != current:
        raise CheckpointError(
            f"the checkpoint {checkpoint_dir} holds {saved} optimizer state, this run uses the {current} "
            "optimizer: match --use-distributed-optimizer to the saved run, or load the weights only "
            "(load_optimizer=False) and start the optimizer afresh"
        )
    if current.startswith("distributed/"):
        saved_layout = {k: metadata.get("layout", {}).get(k) for k in _OPTIMIZER_LAYOUT_KEYS}
        current_layout = {k: parallel_layout()[k] for k in _OPTIMIZER_LAYOUT_KEYS}
        if saved_layout != current_layout:
            raise CheckpointError(
                f"the checkpoint {checkpoint_dir} holds distributed-optimizer state saved at "
                f"{describe_layout(saved_layout)}; this run uses {describe_layout(current_layout)}. That "
                "state only loads at the same TP/PP/VPP sizes (the data-parallel size may differ): resume "
                "at the saved sizes, or load the weights only (load_optimizer=False)"
            )
