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
from pathlib import Path


import torch

from megatron_mile.checkpointing import safe_load
from megatron_mile.checkpointing.errors import CheckpointError

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
        # Both count samples (megatron_mile.training.optimizer.scheduler_settings): no conversion.
        "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "num_floating_point_operations_so_far": int(floating_point_operations),
        "content_metadata": dict(content_metadata),
    }


def read_common(checkpoint_dir: Path) -> dict:
    """A Megatron-LM checkpoint's common.pt (safe_load's allow-list). Raises CheckpointError naming the file
    when it is missing, refused or damaged, or holds no Megatron-LM args. No collectives."""
    common = safe_load.load_weights_only(Path(checkpoint_dir) / "common.pt")
    if not isinstance(common, dict) or not isinstance(common.get("args"), argparse.Namespace):
        raise CheckpointError(f"{checkpoint_dir}/common.pt holds no Megatron-LM args: the checkpoint is damaged")
    return common


def describe(common: dict) -> str:
    """'written by Megatron-LM, iteration N, TP t, PP p' from a common.pt, for messages about a checkpoint."""
    args = common["args"]
    return (f"written by Megatron-LM, iteration {common.get('iteration', getattr(args, 'iteration', '?'))}, "
            f"TP {getattr(args, 'tensor_model_parallel_size', '?')}, "
            f"PP {getattr(args, 'pipeline_model_parallel_size', '?')}")


def training_state_refusal(checkpoint_dir: Path) -> CheckpointError:
    """The error for resuming a Megatron-LM checkpoint's training state, saying what the checkpoint is and
    what this project can do with it (its weights: --finetune or --pretrained-checkpoint)."""
    return CheckpointError(
        f"{checkpoint_dir} is {describe(read_common(checkpoint_dir))}. Its weights load into this project: "
        "continue from them with --finetune (or --pretrained-checkpoint <dir>), which starts at iteration 0 with "
        "a fresh optimizer and schedule; resuming its optimizer, scheduler and RNG states is not supported"
    )


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
