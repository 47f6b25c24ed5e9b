"""Megatron-LM's checkpoints: what its save_checkpoint puts into the common state beside the sharded tensors
(``common.pt``; with megatron-core 0.17+ a ``common_state`` object among the shards), and how this project
resumes a checkpoint Megatron-LM wrote.

A checkpoint of this project carries these items too, so that Megatron-LM (and megatron-core's public
dist_checkpointing.load) finds what it expects:

- ``args``: an argparse.Namespace in Megatron-LM's field names: this run's flags (the project's flags are
  Megatron-LM's names), plus what Megatron-LM derives (padded_vocab_size, data_parallel_size, add_bias_linear,
  add_position_embedding, params_dtype, ...) and its counters (iteration, consumed_train_samples,
  consumed_valid_samples); the loss settings under this project's names (loss_type, mile_gamma, ...);
- ``checkpoint_version`` 3.0, ``iteration``, ``num_floating_point_operations_so_far``;
- ``opt_param_scheduler``: megatron-core's OptimizerParamScheduler state; both count samples (Megatron-LM
  steps its scheduler by the global batch size with --train-iters and --train-samples alike), so the state
  is the same in both;
- ``content_metadata``: how the sharded keys were laid out (megatron-core reads it back before loading);
- beside them, among the sharded items, Megatron-LM's ``rng_state`` object (megatron_mile.checkpointing.rng),
  so that a Megatron-LM run resumes from this project's checkpoint without --no-load-rng (at the same TP/PP
  sizes, as Megatron-LM restores RNG states; written on CPU, it holds no CUDA state).

Resuming a checkpoint Megatron-LM wrote (no mile_checkpoint.json): `resume_description` turns its common state
into the description this project's loader works from (iteration, consumed training and validation samples,
FLOPs so far, scheduler, layout, optimizer format, Adam settings); `check_optimizer` refuses an optimizer
state that does not fit, saying what the checkpoint is and what to do. No collectives in this module.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from megatron_mile.checkpointing import torch_dist
from megatron_mile.checkpointing.errors import CheckpointError
from megatron_mile.checkpointing.rng import RNG_STATE_KEY

# Megatron-LM's checkpoint_version for torch_dist checkpoints (the query/key/value layout of today's models).
CHECKPOINT_VERSION = 3.0


def megatron_lm_args(config_dict: dict, layout: dict, vocab: dict, iteration: int, consumed_train_samples: int,
                     consumed_valid_samples: int) -> argparse.Namespace:
    """The ``args`` Megatron-LM saves, from this run's config dict (config_to_dict), parallel layout
    (compatibility.parallel_layout) and vocabulary sizes (compatibility.vocab_sizes)."""
    values = {}
    for section in config_dict.values():
        values.update(section)
    model, training, optimizer = config_dict["model"], config_dict["training"], config_dict["optimizer"]
    values.update(
        iteration=int(iteration),
        consumed_train_samples=int(consumed_train_samples),
        consumed_valid_samples=int(consumed_valid_samples),
        padded_vocab_size=int(vocab["padded"]),
        tensor_model_parallel_size=layout["tensor_model_parallel_size"],
        pipeline_model_parallel_size=layout["pipeline_model_parallel_size"],
        virtual_pipeline_model_parallel_size=layout["virtual_pipeline_model_parallel_size"],
        data_parallel_size=layout["data_parallel_size"],
        world_size=layout["world_size"],
        # Megatron-LM's derived switches, which its check_checkpoint_args and model builders read.
        add_bias_linear=not model["disable_bias_linear"],
        add_position_embedding=model["position_embedding_type"] == "learned_absolute",
        params_dtype=(torch.bfloat16 if optimizer["bf16"] else
                      torch.float16 if optimizer.get("fp16") else torch.float32),
        num_experts=None,
        lr_decay_iters=optimizer["lr_decay_iters"] or training["train_iters"],
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        use_mcore_models=True,
    )
    return argparse.Namespace(**values)


def megatron_lm_common_state(config_dict: dict, layout: dict, vocab: dict, iteration: int,
                             consumed_train_samples: int, consumed_valid_samples: int, scheduler,
                             content_metadata: dict, floating_point_operations: int = 0) -> dict:
    """The items Megatron-LM's save_checkpoint writes into common.pt (see the module docstring)."""
    return {
        "args": megatron_lm_args(config_dict, layout, vocab, iteration, consumed_train_samples,
                                 consumed_valid_samples),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": int(iteration),
        # Both count samples (module docstring): no conversion.
        "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "num_floating_point_operations_so_far": int(floating_point_operations),
        "content_metadata": dict(content_metadata),
    }


def read_common(checkpoint_dir: Path) -> dict:
    """A Megatron-LM checkpoint's common state: its common.pt, or where megatron-core 0.17+ keeps it, the
    ``common_state`` object among the shards (torch_dist.read_common_state; safe_load's allow-list). Raises
    CheckpointError naming the file when it is missing, refused or damaged, or holds no Megatron-LM args.
    No collectives."""
    common = torch_dist.read_common_state(Path(checkpoint_dir))
    if not isinstance(common, dict) or not isinstance(common.get("args"), argparse.Namespace):
        raise CheckpointError(f"{checkpoint_dir}: its common state holds no Megatron-LM args: the checkpoint is damaged")
    return common


def describe(common: dict) -> str:
    """'written by Megatron-LM, iteration N, TP t, PP p' from its common state, for messages about a checkpoint."""
    args = common["args"]
    return (f"written by Megatron-LM, iteration {common.get('iteration', getattr(args, 'iteration', '?'))}, "
            f"TP {getattr(args, 'tensor_model_parallel_size', '?')}, "
            f"PP {getattr(args, 'pipeline_model_parallel_size', '?')}")


def check_model_args(common: dict, config_dict: dict, padded_vocab_size: int, checkpoint_dir: Path) -> None:
    """The checkpoint's args must describe this run's model (as Megatron-LM's check_checkpoint_args):
    layers, hidden and MLP sizes, heads and query groups, biases, position embeddings, padded vocabulary."""
    args, model = common["args"], config_dict["model"]
    mine = {
        "num_layers": model["num_layers"], "hidden_size": model["hidden_size"],
        "ffn_hidden_size": model["ffn_hidden_size"], "num_attention_heads": model["num_attention_heads"],
        "num_query_groups": model["num_query_groups"] if model["group_query_attention"] else None,
        "add_bias_linear": not model["disable_bias_linear"],
        "add_position_embedding": model["position_embedding_type"] == "learned_absolute",
        "swiglu": model["swiglu"], "normalization": model["normalization"],
        "untie_embeddings_and_output_weights": model["untie_embeddings_and_output_weights"],
        "padded_vocab_size": padded_vocab_size,
    }
    if not getattr(args, "group_query_attention", False):
        mine.pop("num_query_groups")
    differing = [f"{name}: checkpoint {getattr(args, name, None)!r}, this run {value!r}"
                 for name, value in mine.items() if getattr(args, name, None) != value]
    if differing:
        raise CheckpointError(
            f"{checkpoint_dir} ({describe(common)}) holds a different model:\n  - " + "\n  - ".join(differing)
            + "\nUse the model flags of the Megatron-LM run that wrote it"
        )


def rename_chunks(state: dict, back: bool = False) -> dict:
    """This project's chunk keys ('model0', 'model1', ...) -> Megatron-LM's ('model' for a single chunk, the
    same names with virtual pipeline stages); `back` reverses it. Returns a new dict."""
    single = [key for key in state if key.startswith("model")] == (["model"] if back else ["model0"])
    if not single:
        return dict(state)
    source, target = ("model", "model0") if back else ("model0", "model")
    return {(target if key == source else key): value for key, value in state.items()}


# The distributed optimizer's layouts of its state (megatron-core's distrib_optim_sharding_type): the one this
# project reads is dp_reshardable, Megatron-LM's default (see torch_dist.DISTRIBUTED_OPTIMIZER_SHARDING).
_LEGACY_DISTRIBUTED_SHARDING = "dp_zero_gather_scatter"  # checkpoints of megatron-core < 0.13 (no content_metadata)


def _optimizer_format(common: dict) -> str:
    """'distributed/<sharding type>' or 'standard', in compatibility.optimizer_format's terms."""
    if not getattr(common["args"], "use_distributed_optimizer", False):
        return "standard"
    sharding = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type", _LEGACY_DISTRIBUTED_SHARDING)
    return f"distributed/{sharding}"


def resume_description(common: dict, stored_keys: set) -> dict:
    """What this project's loader needs to resume a Megatron-LM checkpoint, in the shape of its own
    mile_checkpoint.json (save.common_state): iteration, consumed_samples and consumed_valid_samples (from
    `args`, as Megatron-LM's loader takes them), num_floating_point_operations_so_far, scheduler, has_optimizer,
    has_rng, optimizer_format, layout and the Adam settings under config.optimizer. `stored_keys` are the
    checkpoint's sharded keys (torch_dist.stored_keys). No collectives."""
    args = common["args"]
    return {
        "iteration": int(common.get("iteration", getattr(args, "iteration", 0))),
        "consumed_samples": int(getattr(args, "consumed_train_samples", 0) or 0),
        "consumed_valid_samples": int(getattr(args, "consumed_valid_samples", 0) or 0),
        "num_floating_point_operations_so_far": int(common.get("num_floating_point_operations_so_far", 0) or 0),
        "scheduler": common.get("opt_param_scheduler"),
        "has_optimizer": "optimizer" in common or any(key.startswith("optimizer.") for key in stored_keys),
        "has_rng": any(key.startswith(RNG_STATE_KEY + "/") for key in stored_keys),
        "data_parallel_random_init": bool(getattr(args, "data_parallel_random_init", False)),
        "optimizer_format": _optimizer_format(common),
        "layout": {
            "tensor_model_parallel_size": getattr(args, "tensor_model_parallel_size", 1),
            "pipeline_model_parallel_size": getattr(args, "pipeline_model_parallel_size", 1),
            "virtual_pipeline_model_parallel_size": getattr(args, "virtual_pipeline_model_parallel_size", None),
            "data_parallel_size": getattr(args, "data_parallel_size", None),
            "world_size": getattr(args, "world_size", None),
        },
        "config": {"optimizer": {name: getattr(args, name) for name in ("adam_beta1", "adam_beta2", "adam_eps")
                                 if hasattr(args, name)}},
    }


def check_optimizer(common: dict, config_dict: dict, current_format: Optional[str], checkpoint_dir: Path) -> None:
    """Refuse, before any tensor is read, a Megatron-LM optimizer state this run cannot take: another optimizer
    (--optimizer), another precision (--bf16 / --fp16: the fp32 main weights are part of the state), the
    distributed optimizer against the plain one or the other way round, and a distributed layout other than
    dp_reshardable. The TP/PP sizes of a dp_reshardable state are compatibility.check_optimizer_compatible's.
    Each message says what the checkpoint is and how to continue (matching flags, or --no-load-optim). No
    collectives."""
    args, optimizer = common["args"], config_dict["optimizer"]
    saved_format = _optimizer_format(common)
    differing = []
    if getattr(args, "optimizer", "adam") != optimizer["optimizer"]:
        differing.append(f"optimizer (--optimizer): checkpoint {getattr(args, 'optimizer', 'adam')!r}, "
                         f"this run {optimizer['optimizer']!r}")
    precision = "fp16" if getattr(args, "fp16", False) else "bf16" if getattr(args, "bf16", False) else "fp32"
    if precision != ("bf16" if optimizer["bf16"] else "fp32"):
        differing.append(f"precision (--bf16 / --fp16): checkpoint {precision}, this run "
                         f"{'bf16' if optimizer['bf16'] else 'fp32'}")
    if saved_format.startswith("distributed/") != (current_format or "").startswith("distributed/"):
        differing.append(f"--use-distributed-optimizer: checkpoint {saved_format.startswith('distributed/')}, "
                         f"this run {(current_format or '').startswith('distributed/')}")
    if differing:
        raise CheckpointError(
            f"{checkpoint_dir} ({describe(common)}) holds optimizer state this run cannot take:\n  - "
            + "\n  - ".join(differing)
            + "\nUse the Megatron-LM run's flags, or resume with --no-load-optim (the weights, iteration, data "
            "position and RNG states load; the optimizer starts afresh)"
        )
    if saved_format != current_format:
        raise CheckpointError(
            f"{checkpoint_dir} ({describe(common)}) holds the distributed optimizer's state in the "
            f"'{saved_format.split('/', 1)[1]}' layout; this project reads its '{current_format.split('/', 1)[1]}' "
            "layout only (Megatron-LM's default, without --dist-ckpt-optim-fully-reshardable). Resume with "
            "--no-load-optim, or save from Megatron-LM in that layout"
        )
