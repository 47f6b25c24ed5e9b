"""Interoperability with Megatron-LM's torch_dist checkpoints: what this project writes is what Megatron-LM's
loader reads (through megatron-core's public dist_checkpointing API, the fields its loader takes from
common.pt), and the restricted unpickler admits exactly the classes such checkpoints legitimately hold.

The expected values come from the run's own settings (iterations, samples, layout), not from the code under
test; Megatron-LM's field names are those of its save_checkpoint (core_r0.16.0).
"""

from __future__ import annotations

import argparse
import io
import pickle
import types

import numpy as np
import pytest
import torch
from checkpoint_cases import build, full_params, make_config, run_step

from megatron_mile import checkpointing
from megatron_mile.arguments import config_to_dict
from megatron_mile.checkpointing import safe_load

# The globals a genuine torch_dist `.metadata` written by Megatron-LM refers to (torch 2.13).
GENUINE_METADATA_GLOBALS = [
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    *[("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")],
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *[("torch.distributed.checkpoint.planner", name) for name in
      ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")],
]


def _global_pickle(module: str, name: str) -> bytes:
    """A pickle (protocol 0) whose whole content is a reference to module.name."""
    return f"c{module}\n{name}\n.".encode()


@pytest.mark.parametrize("module,name", GENUINE_METADATA_GLOBALS, ids=lambda v: v if isinstance(v, str) else None)
def test_metadata_unpickler_admits_each_class_of_a_genuine_checkpoint(module, name):
    import importlib

    loaded = safe_load.MetadataUnpickler(io.BytesIO(_global_pickle(module, name))).load()
    assert loaded is getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int64", "uint8", "bool"])
def test_metadata_unpickler_admits_the_dtypes(dtype):
    assert safe_load.MetadataUnpickler(io.BytesIO(_global_pickle("torch", dtype))).load() is getattr(torch, dtype)


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("torch", "load"),
                                         ("argparse", "Namespace"), ("torch.distributed.checkpoint.planner",
                                                                     "SavePlanner")])
def test_metadata_unpickler_refuses_anything_else(module, name):
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        safe_load.MetadataUnpickler(io.BytesIO(_global_pickle(module, name))).load()


def _saved(value) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def test_common_state_admits_megatron_lm_args():
    import megatron.core  # noqa: F401 - registers megatron-core's own classes process-wide, as a run does

    args = argparse.Namespace(num_layers=2, params_dtype=torch.bfloat16, data_path=["a"], lr_decay_iters=None)
    assert safe_load.load_weights_only(_saved({"args": args}), "common.pt")["args"] == args


def test_object_shards_admit_numpy_rng_state_and_common_state_does_not():
    state = [{"np_rng_state": np.random.get_state()}]
    with pytest.raises(checkpointing.CheckpointError, match="_reconstruct"):
        safe_load.load_weights_only(_saved(state), "common.pt")
    loaded = safe_load.load_weights_only(_saved(state), "rng shard",
                                         safe_load.COMMON_STATE_ALLOWED + safe_load.OBJECT_SHARD_ALLOWED)
    assert np.array_equal(loaded[0]["np_rng_state"][1], state[0]["np_rng_state"][1])


def test_classes_registered_by_megatron_core_are_not_admitted():
    import megatron.core  # noqa: F401 - registers SimpleNamespace among others with torch

    assert types.SimpleNamespace in torch.serialization.get_safe_globals()
    with pytest.raises(checkpointing.CheckpointError, match="SimpleNamespace"):
        safe_load.load_weights_only(_saved({"x": types.SimpleNamespace(a=1)}), "common.pt")
    assert types.SimpleNamespace in torch.serialization.get_safe_globals()  # put back afterwards


# ----------------------------------------------------------------------------------------------------------
# What Megatron-LM's loader reads from a checkpoint of this project
# ----------------------------------------------------------------------------------------------------------

STEPS, CONSUMED, CONSUMED_VALID = 3, 24, 6
GLOBAL_BATCH = 4
BATCH_FLAGS = ["--micro-batch-size", "2", "--global-batch-size", str(GLOBAL_BATCH)]


def worker_megatron_core_reads_ours(directory):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.utils import unwrap_model

    config = make_config(dropout=0.0, extra_flags=BATCH_FLAGS)
    model, optimizer, scheduler = build(config)
    for step in range(STEPS):
        run_step(model, optimizer, scheduler, step)
    saved_params = full_params(model)
    checkpointing.save_checkpoint(directory, STEPS, model, optimizer, scheduler, CONSUMED, config_to_dict(config),
                                  consumed_valid_samples=CONSUMED_VALID)
    path = f"{directory}/iter_{STEPS:07d}"

    # As Megatron-LM's loader: the common state first, the content metadata from it, then the model
    # (one chunk: Megatron-LM's key 'model') into a fresh model built from another seed.
    common = dist_checkpointing.load_common_state_dict(path)
    metadata = dist_checkpointing.load_content_metadata(path)
    fresh, _, _ = build(make_config(dropout=0.0, seed=77))
    chunk = unwrap_model(fresh[0])
    loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict(metadata=metadata)}, path)
    chunk.load_state_dict(loaded["model"], strict=True)
    args = common["args"]
    return {
        "weights_equal": all(torch.equal(saved_params[k], v) for k, v in full_params(fresh).items()),
        "iteration": common["iteration"],
        "checkpoint_version": common["checkpoint_version"],
        "flops": common["num_floating_point_operations_so_far"],
        "scheduler": common["opt_param_scheduler"],
        "args": {k: getattr(args, k, "MISSING") for k in (
            "iteration", "consumed_train_samples", "consumed_valid_samples", "num_layers", "hidden_size",
            "num_attention_heads", "ffn_hidden_size", "seq_length", "max_position_embeddings", "padded_vocab_size",
            "make_vocab_size_divisible_by", "tokenizer_type", "tensor_model_parallel_size",
            "pipeline_model_parallel_size", "add_position_embedding", "add_bias_linear", "train_iters",
            "global_batch_size", "loss_type", "params_dtype")},
        "args_type": type(args).__name__,
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
    }


def test_megatron_core_public_load_reads_a_checkpoint_of_this_project(dist_pool, tmp_path):
    results = dist_pool(2).run(worker_megatron_core_reads_ours, str(tmp_path), tensor_model_parallel_size=2)
    for result in results:
        assert result["weights_equal"]
        assert result["args_type"] == "Namespace"
        assert (result["iteration"], result["checkpoint_version"], result["flops"]) == (STEPS, 3.0, 0)
        global_batch = GLOBAL_BATCH
        # Megatron-LM's scheduler counts samples: steps times the global batch size.
        assert result["scheduler"]["num_steps"] == STEPS * global_batch
        assert result["scheduler"]["lr_decay_steps"] == 10 * global_batch  # make_config: --train-iters 10
        assert result["scheduler"]["lr_warmup_steps"] == 2 * global_batch
        assert result["scheduler"]["max_lr"] == 1e-2 and result["scheduler"]["lr_decay_style"] == "cosine"
        assert result["args"] == {
            "iteration": STEPS, "consumed_train_samples": CONSUMED, "consumed_valid_samples": CONSUMED_VALID,
            "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256, "seq_length": 16,
            "max_position_embeddings": 16, "padded_vocab_size": 128, "make_vocab_size_divisible_by": 64,
            "tokenizer_type": "NullTokenizer", "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
            "add_position_embedding": True, "add_bias_linear": True, "train_iters": 10,
            "global_batch_size": global_batch, "loss_type": "cross_entropy", "params_dtype": torch.float32,
        }
