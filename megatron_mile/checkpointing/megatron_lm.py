"""Megatron-LM's common state: what its save_checkpoint puts into ``common.pt`` beside the sharded tensors, and
what its loader reads back from there.

A checkpoint of this project carries these items too, so that Megatron-LM (and megatron-core's public
dist_checkpointing.load) finds what it expects:

- ``args``: an argparse.Namespace in Megatron-LM's field names: this run's flags (the project's flags are
  Megatron-LM's names), plus what Megatron-LM derives (padded_vocab_size, data_parallel_size, add_bias_linear,
  add_position_embedding, params_dtype, ...) and its counters (iteration, consumed_train_samples,
  consumed_valid_samples); the loss settings under this project's names (loss_type, mile_gamma, ...);
- ``checkpoint_version`` 3.0, ``iteration``, ``num_floating_point_operations_so_far``;
- ``opt_param_scheduler``: megatron-core's OptimizerParamScheduler state in Megatron-LM's units (samples: the
  project's iterations times the global batch size; megatron_mile.checkpointing.scheduler converts);
- ``content_metadata``: how the sharded keys were laid out (megatron-core reads it back before loading).

Not written: Megatron-LM's ``rng_state`` sharded object (this project keeps its per-rank RNG files,
``rng/rank_*.pt``, which hold no numpy objects and so load without admitting numpy's classes); a Megatron-LM
run resuming from this project's checkpoint needs ``--no-load-rng``. No collectives in this module.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from megatron_mile.checkpointing.scheduler import to_megatron_lm_units

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
        params_dtype=torch.bfloat16 if optimizer["bf16"] else torch.float32,
        fp16=False,
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
    global_batch_size = config_dict["training"]["global_batch_size"]
    return {
        "args": megatron_lm_args(config_dict, layout, vocab, iteration, consumed_train_samples,
                                 consumed_valid_samples),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": int(iteration),
        "opt_param_scheduler": (to_megatron_lm_units(scheduler.state_dict(), global_batch_size)
                                if scheduler is not None else None),
        "num_floating_point_operations_so_far": int(floating_point_operations),
        "content_metadata": dict(content_metadata),
    }


def written_by_megatron_lm(common: dict) -> bool:
    """Whether a loaded common.pt is Megatron-LM's own (its args, no description of this project)."""
    return isinstance(common.get("args"), argparse.Namespace) and "checkpoint_version" in common


def describe(common: dict, default: Optional[str] = None) -> str:
    """'iteration N, TP t, PP p' from a common.pt's args, for messages about a checkpoint."""
    args = common.get("args")
    if not isinstance(args, argparse.Namespace):
        return default or "no Megatron-LM args"
    return (f"iteration {common.get('iteration', getattr(args, 'iteration', '?'))}, "
            f"TP {getattr(args, 'tensor_model_parallel_size', '?')}, "
            f"PP {getattr(args, 'pipeline_model_parallel_size', '?')}")
