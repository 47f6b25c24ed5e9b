"""Load a checkpoint of any TP/PP/VPP layout into one process as full tensors (the TP=1, PP=1 model's).

Why through megatron's own model and sharded state dict rather than reading the files by hand: the
torch_dist checkpoint stores each tensor with its global shape and offsets in megatron's sharded-key
layout (SwiGLU's fc1 split into gate and up shards, layers numbered globally, ...). Building the
single-process model and loading into it with the project's safe loader
(megatron_mile.checkpointing.load_model_weights) reuses the code that resharding at load time
is tested with, instead of a second reading of megatron's layout.

Memory: the model is built without initialising its weights (they are overwritten by the load), so a
load holds one copy of the weights in the checkpoint's dtype; an export converts them into a second one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from megatron_mile import checkpointing, parallel
from megatron_mile.arguments import config_from_dict, config_to_dict
from megatron_mile.config import RunConfig
from megatron_mile.model import build_model_chunk, transformer_config
from megatron_mile.training.initialize import set_random_seeds


@dataclass
class FullCheckpoint:
    """One checkpoint's weights at TP=1/PP=1 and what it was trained with."""

    config: RunConfig
    """The run's saved configuration (parallel sizes as saved)."""
    iteration: int
    real_vocab_size: int
    """Tokens of the run's tokenizer: the rows of the embedding that are real tokens."""
    padded_vocab_size: int
    """Rows of the embedding and output weights (the real vocabulary plus megatron's padding)."""
    params: Dict[str, torch.Tensor]
    """{megatron parameter name of the single-process model: full tensor on the CPU}."""


def read_metadata(load_dir, iteration: Optional[int] = None) -> dict:
    """The checkpoint's plain-data description (no tensors read, no process group needed).

    Raises FileNotFoundError for a missing directory, one without a latest-iteration file, or a named
    iteration that does not exist; ValueError for a corrupt description.
    """
    return checkpointing.read_checkpoint_metadata(load_dir, iteration)


def single_process_config(saved: RunConfig, padded_vocab_size: int) -> RunConfig:
    """The saved run's config rebuilt for one process: TP=PP=1, no virtual pipeline or sequence parallelism.

    The vocabulary-padding multiple is set to the saved padded size, so that the TP=1 model pads the same
    real vocabulary to the same number of rows (a TP=2 run pads to a multiple of 2 * 128, a TP=1 run to a
    multiple of 128), and the checkpoint's embedding and output weights load unchanged.
    """
    config = copy.deepcopy(saved)
    p = config.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 1
    p.num_layers_per_virtual_pipeline_stage = None
    p.sequence_parallel = False
    p.use_distributed_optimizer = False
    config.model.make_vocab_size_divisible_by = padded_vocab_size
    return config


def load_single_process_model(load_dir, metadata: dict):
    """The checkpoint's model built at TP=1/PP=1 in this process, its weights loaded (a MileGPTModel).

    Needs megatron's parallel state at TP=1/PP=1 (set up by the caller, as load_full_checkpoint does).
    `metadata` is read_metadata(load_dir, iteration): it names the iteration that is loaded.
    """
    real, padded = _vocab_sizes(load_dir, metadata)
    config = single_process_config(config_from_dict(metadata["config"]), padded)
    set_random_seeds(config.training.seed)
    tf_config = transformer_config(config)
    # The load overwrites every weight: skip drawing them (minutes for large models).
    tf_config.perform_initialization = False
    model = build_model_chunk(config, tf_config, real, pre_process=True, post_process=True)
    checkpointing.load_model_weights(load_dir, [model], iteration=int(metadata["iteration"]),
                                     config_dict=config_to_dict(config))
    return model


def _vocab_sizes(load_dir, metadata: dict):
    vocab = metadata.get("vocab", {})
    real, padded = int(vocab.get("real", -1)), int(vocab.get("padded", -1))
    if real < 1 or padded < real:
        raise ValueError(f"the checkpoint in {load_dir} records no usable vocabulary sizes ({vocab}); it is damaged")
    return real, padded


def load_full_checkpoint(load_dir, iteration: Optional[int] = None, metadata: Optional[dict] = None) -> FullCheckpoint:
    """Load the latest checkpoint of `load_dir` (or `iteration`, or the one `metadata` describes) as full
    TP=1 tensors on the CPU.

    Works in a plain single process (a gloo group of one is created and destroyed); the checkpoint may have
    been saved at any TP/PP/VPP/DP layout. Reads only with the project's safe loader (weights_only).
    Raises FileNotFoundError / ValueError (CheckpointError) naming the path and the fix.
    """
    if metadata is None:
        metadata = read_metadata(load_dir, iteration)
    real, padded = _vocab_sizes(load_dir, metadata)
    with parallel.single_process_parallel_state():
        model = load_single_process_model(load_dir, metadata)
        params = {name: param.detach().to("cpu") for name, param in model.named_parameters()}
    return FullCheckpoint(config=config_from_dict(metadata["config"]), iteration=int(metadata["iteration"]),
                          real_vocab_size=real, padded_vocab_size=padded, params=params)
