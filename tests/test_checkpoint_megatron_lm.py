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
import signal
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_cases import (
    build,
    common_layout_of,
    full_params,
    make_config,
    native_common_layout,
    run_step,
    save_as_megatron_core,
)

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


def _common_state_classes():
    """(class, args field holding it in a Megatron-LM checkpoint, value), one per class the common state admits."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend, CudaGraphScope

    return [
        (argparse.Namespace, "args", argparse.Namespace(num_layers=2)),
        (ModelType, "model_type", ModelType.encoder_or_decoder),  # get_model sets it
        (AttnBackend, "attention_backend", AttnBackend.auto),  # --attention-backend's default
        (signal.Signals, "exit_signal", signal.SIGTERM),  # --exit-signal's default
        (CudaGraphScope, "cuda_graph_scope", [CudaGraphScope.attn]),  # --cuda-graph-scope attn
    ]


@pytest.mark.parametrize("index", range(5), ids=["Namespace", "ModelType", "AttnBackend", "Signals", "CudaGraphScope"])
def test_common_state_admits_each_class_megatron_lm_args_hold_and_needs_it(index):
    import megatron.core  # noqa: F401 - registers megatron-core's own classes process-wide, as a run does

    cls, field, value = _common_state_classes()[index]
    common = {"args": argparse.Namespace(**{field: value, "num_layers": 2})}
    assert safe_load.load_weights_only(_saved(common), "common.pt") == common
    assert cls in safe_load.COMMON_STATE_ALLOWED
    # Each admitted class is needed: without it, the same file is refused by the class's name.
    without = tuple(c for c in safe_load.COMMON_STATE_ALLOWED if c is not cls)
    with pytest.raises(checkpointing.CheckpointError, match=cls.__name__):
        safe_load.load_weights_only(_saved(common), "common.pt", without)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_common_state_admits_torch_dtypes_without_an_entry(dtype):
    """params_dtype, main_grads_dtype, ...: torch's weights-only unpickler admits dtypes itself."""
    common = {"args": argparse.Namespace(params_dtype=dtype, main_grads_dtype=torch.float32)}
    assert safe_load.load_weights_only(_saved(common), "common.pt", (argparse.Namespace,)) == common


@pytest.mark.parametrize("index", range(4), ids=["_reconstruct", "ndarray", "dtype", "UInt32DType"])
def test_rng_state_admits_each_numpy_class_and_needs_it(index):
    """Megatron-LM's rng_state holds numpy's RNG state (an ndarray of uint32) and torch's RNG ByteTensor."""
    state = [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state(),
              "random_rng_state": __import__("random").getstate()}]
    allowed = safe_load.COMMON_STATE_ALLOWED + safe_load.OBJECT_SHARD_ALLOWED
    loaded = safe_load.load_weights_only(_saved(state), "rng shard", allowed)
    assert np.array_equal(loaded[0]["np_rng_state"][1], state[0]["np_rng_state"][1])
    assert loaded[0]["np_rng_state"][1].dtype == np.uint32
    assert torch.equal(loaded[0]["torch_rng_state"], state[0]["torch_rng_state"])
    assert loaded[0]["random_rng_state"] == state[0]["random_rng_state"]
    needed = safe_load.OBJECT_SHARD_ALLOWED[index]
    with pytest.raises(checkpointing.CheckpointError, match="rng shard"):  # refused (or unreadable) without it
        safe_load.load_weights_only(_saved(state), "rng shard", tuple(c for c in allowed if c is not needed))


def test_common_state_refuses_megatron_core_classes_outside_args():
    """megatron-core registers its rerun-state classes process-wide; a checkpoint's common state never needs them."""
    from megatron.core.rerun_state_machine import RerunMode

    with pytest.raises(checkpointing.CheckpointError, match="RerunMode"):
        safe_load.load_weights_only(_saved({"x": RerunMode.DISABLED}), "common.pt")


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
    import random

    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.utils import unwrap_model

    config = make_config(dropout=0.0, extra_flags=BATCH_FLAGS)
    model, optimizer, scheduler = build(config)
    for step in range(STEPS):
        run_step(model, optimizer, scheduler, step, samples_per_step=config.training.global_batch_size)
    saved_params = full_params(model)
    # The RNG states of the moment of saving, read from the generators themselves.
    saved_rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(),
                 {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()})
    checkpointing.save_checkpoint(directory, STEPS, model, optimizer, scheduler, CONSUMED, config_to_dict(config),
                                  consumed_valid_samples=CONSUMED_VALID)
    path = f"{directory}/iter_{STEPS:07d}"

    # As Megatron-LM's loader: the common state first, the content metadata from it, then the model
    # (one chunk: Megatron-LM's key 'model') into a fresh model built from another seed.
    common = dist_checkpointing.load_common_state_dict(path)
    metadata = dist_checkpointing.load_content_metadata(path)
    fresh, _, _ = build(make_config(dropout=0.0, seed=77))
    chunk = unwrap_model(fresh[0])
    # Megatron-LM's rng_state: one entry per (PP, TP) rank, data-parallel ranks as replicas.
    rng_request = ShardedObject("rng_state", None, (parallel_state.get_pipeline_model_parallel_world_size(),
                                                    parallel_state.get_tensor_model_parallel_world_size()),
                                (parallel_state.get_pipeline_model_parallel_rank(),
                                 parallel_state.get_tensor_model_parallel_rank()),
                                replica_id=parallel_state.get_data_parallel_rank())
    loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict(metadata=metadata), "rng_state": rng_request},
                                     path)
    chunk.load_state_dict(loaded["model"], strict=True)
    args = common["args"]
    (rng,) = loaded["rng_state"]
    return {
        "rng_keys": sorted(rng),
        "rng_equal": (rng["random_rng_state"] == saved_rng[0] and np.array_equal(rng["np_rng_state"][1], saved_rng[1])
                      and torch.equal(rng["torch_rng_state"], saved_rng[2]) and rng["cuda_rng_state"] is None
                      and rng["rng_tracker_states"].keys() == saved_rng[3].keys()
                      and all(torch.equal(rng["rng_tracker_states"][k], v) for k, v in saved_rng[3].items())),
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
        assert result["rng_keys"] == ["cuda_rng_state", "np_rng_state", "random_rng_state", "rng_tracker_states",
                                      "torch_rng_state"]
        assert result["rng_equal"]
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


# ----------------------------------------------------------------------------------------------------------
# megatron-core 0.17+'s place for the common items: a "common_state" object among the shards, no common.pt.
# Built here with torch.distributed.checkpoint alone (the object's key and its [state] payload as megatron-core
# 0.19's serialization.save stores them); the worker tests below write it with megatron-core's own save.
# ----------------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): the marker directory exists only if code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def _write_common_state_checkpoint(path: Path, payload, with_object: bool = True) -> Path:
    """A torch_dist checkpoint directory with one tensor and, with `with_object`, `payload` pickled as the
    common_state object's bytes; megatron's format tag beside it."""
    import json

    from torch.distributed import checkpoint as torch_dcp

    state = {"model.weight": torch.arange(6.0).reshape(2, 3)}
    if with_object:
        state["common_state/shard_0_1"] = payload  # torch.save()d whole into one byte record (no flattening)
    path.mkdir(parents=True)
    torch_dcp.save(state, storage_writer=torch_dcp.FileSystemWriter(str(path)), no_dist=True,
                   planner=torch_dcp.DefaultSavePlanner(flatten_state_dict=False))
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return path


def test_common_state_object_is_read_without_common_pt(tmp_path):
    from megatron_mile.checkpointing.torch_dist import read_common_state
    from megatron_mile.checkpointing.tracker import written_by_megatron_lm

    from megatron.core.enums import ModelType

    common = {"args": argparse.Namespace(num_layers=2, model_type=ModelType.encoder_or_decoder), "iteration": 7,
              "content_metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}
    path = _write_common_state_checkpoint(tmp_path / "iter_0000007", [common])
    assert not (path / "common.pt").exists()
    assert written_by_megatron_lm(path)
    assert read_common_state(path) == common
    assert checkpointing.megatron_lm.read_common(path)["iteration"] == 7


def test_common_state_object_megatron_core_reads_the_same(tmp_path):
    """Where the installed megatron-core has its own reader of the object (0.17+), it returns the same dict."""
    from megatron.core.dist_checkpointing import serialization

    from megatron_mile.checkpointing.torch_dist import read_common_state

    if native_common_layout() != "common_state":
        pytest.skip("megatron-core 0.16.1 writes and reads common.pt only")
    common = {"args": argparse.Namespace(num_layers=2), "iteration": 3, "checkpoint_version": 3.0}
    path = _write_common_state_checkpoint(tmp_path / "ckpt", [common])
    assert read_common_state(path) == serialization.load_common_state_dict(str(path)) == common


def test_tampered_common_state_object_is_refused_in_one_line(tmp_path):
    from megatron_mile.checkpointing.torch_dist import read_common_state

    marker = tmp_path / "code_ran"
    path = _write_common_state_checkpoint(tmp_path / "ckpt", [{"args": _RunsCode(str(marker))}])
    with pytest.raises(checkpointing.CheckpointError) as refused:
        read_common_state(path)
    assert not marker.exists(), "unpickling ran code"
    message = str(refused.value)
    assert "\n" not in message and "mkdir" in message and str(path / "__0_0.distcp") in message, message
    assert "weights_only" not in message.replace(str(path), ""), message


@pytest.mark.parametrize("payload,expected", [
    ({"args": argparse.Namespace()}, "is not a state dict"),  # not the [state] list the writer stores
    ([1, 2], "is not a state dict"),
    (None, "holds neither common.pt nor a 'common_state' object"),
], ids=["unwrapped", "not_a_dict", "missing"])
def test_common_state_object_that_is_not_one_is_refused(tmp_path, payload, expected):
    from megatron_mile.checkpointing.torch_dist import read_common_state

    path = _write_common_state_checkpoint(tmp_path / "ckpt", payload, with_object=payload is not None)
    with pytest.raises(checkpointing.CheckpointError, match=expected):
        read_common_state(path)


def test_common_state_object_outside_the_checkpoint_is_refused(tmp_path):
    """A tampered `.metadata` that points the object at a file outside the directory: refused, nothing read."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from megatron_mile.checkpointing.torch_dist import read_common_state

    path = _write_common_state_checkpoint(tmp_path / "ckpt", [{"args": argparse.Namespace()}])
    metadata = safe_load.load_checkpoint_metadata(path / ".metadata")
    metadata.storage_data[MetadataIndex("common_state/shard_0_1")].relative_path = "../elsewhere.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(checkpointing.CheckpointError, match="places 'common_state' at '../elsewhere.distcp'"):
        read_common_state(path)


def test_metadata_of_another_shape_is_refused_in_one_line(tmp_path):
    """The allow-list admits the metadata classes; an object of another class (a tuple here) is damage."""
    from megatron_mile.checkpointing.torch_dist import read_common_state

    path = _write_common_state_checkpoint(tmp_path / "ckpt", [{"args": argparse.Namespace()}])
    (path / ".metadata").write_bytes(pickle.dumps(("not", "metadata")))
    with pytest.raises(checkpointing.CheckpointError, match="is not torch.distributed.checkpoint metadata"):
        read_common_state(path)


def test_an_oversized_common_pt_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from megatron_mile.checkpointing.torch_dist import read_common_state

    path = tmp_path / "ckpt"
    path.mkdir()
    torch.save({"args": argparse.Namespace(), "pad": "x" * 4096}, path / "common.pt")
    monkeypatch.setattr(safe_load, "MAX_PICKLED_FILE_BYTES", 1024)
    monkeypatch.setattr(safe_load.torch, "load", lambda *a, **k: pytest.fail("read before its size was checked"))
    with pytest.raises(checkpointing.CheckpointError, match="bytes, more than the 1,024"):
        read_common_state(path)


def test_common_state_object_size_is_checked_before_it_is_read(tmp_path, monkeypatch):
    from megatron_mile.checkpointing import torch_dist

    path = _write_common_state_checkpoint(tmp_path / "ckpt", [{"args": argparse.Namespace(), "pad": "x" * 4096}])
    monkeypatch.setattr(safe_load, "MAX_PICKLED_FILE_BYTES", 4096)
    read = []
    monkeypatch.setattr(torch_dist._SafeLoadPlanner, "load_bytes", lambda *a: read.append(a))
    with pytest.raises(checkpointing.CheckpointError, match="with [0-9]+ bytes \\(a file of the checkpoint directory, at most 4,096 bytes"):
        torch_dist.read_common_state(path)
    assert not read


# ----------------------------------------------------------------------------------------------------------
# Checkpoints Megatron-LM wrote: built with megatron-core's public dist_checkpointing.save and the common
# state Megatron-LM's save_checkpoint writes (its documented fields), then loaded here
# ----------------------------------------------------------------------------------------------------------

ML_ITERATION = 7


def _megatron_lm_args(config, consumed):
    from megatron.core import parallel_state

    m = config.model
    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, group_query_attention=False, num_query_groups=1,
        seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings, padded_vocab_size=128,
        make_vocab_size_divisible_by=64, tokenizer_type="NullTokenizer", add_bias_linear=True,
        add_position_embedding=True, swiglu=False, normalization="LayerNorm",
        untie_embeddings_and_output_weights=False, params_dtype=torch.float32, iteration=ML_ITERATION,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        consumed_train_samples=consumed, consumed_valid_samples=0, train_iters=10, global_batch_size=2,
    )


def worker_write_as_megatron_lm(directory, common_layout):
    """A checkpoint in Megatron-LM's layout: model under 'model', its common items (in `common_layout`, see
    checkpoint_cases.save_as_megatron_core), its rng_state object."""
    import random

    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.utils import unwrap_model

    config = make_config(dropout=0.0)
    model, optimizer, scheduler = build(config)
    run_step(model, optimizer, scheduler, 1)
    content_metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    pp, tp = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None,
           "rng_tracker_states": get_cuda_rng_tracker().get_states()}
    state = {
        "model": unwrap_model(model[0]).sharded_state_dict(metadata=content_metadata),
        "args": _megatron_lm_args(config, consumed=2 * ML_ITERATION),
        "checkpoint_version": 3.0,
        "iteration": ML_ITERATION,
        "opt_param_scheduler": {"max_lr": 1e-2, "lr_warmup_steps": 4, "num_steps": 14, "lr_decay_style": "cosine",
                                "lr_decay_steps": 20, "min_lr": 0.0, "start_wd": 0.1, "end_wd": 0.1,
                                "wd_incr_style": "constant", "wd_incr_steps": 20},
        "num_floating_point_operations_so_far": 12345,
        "rng_state": ShardedObject("rng_state", [rng], (pp, tp),
                                   (parallel_state.get_pipeline_model_parallel_rank(),
                                    parallel_state.get_tensor_model_parallel_rank()),
                                   replica_id=parallel_state.get_data_parallel_rank()),
    }
    path = Path(directory) / f"iter_{ML_ITERATION:07d}"
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True)
    torch.distributed.barrier()
    save_as_megatron_core(state, path, content_metadata, common_layout)
    assert common_layout_of(path) == common_layout
    if torch.distributed.get_rank() == 0:
        (Path(directory) / "latest_checkpointed_iteration.txt").write_text(str(ML_ITERATION))
    torch.distributed.barrier()
    return full_params(model), run_step(model, optimizer, scheduler, 5, train=False)


def worker_load_megatron_lm(directory):
    """Its weights through load_model_weights (as --finetune), and load_checkpoint's refusal to resume it with
    an optimizer (the checkpoint holds no optimizer state)."""
    config = make_config(dropout=0.0, seed=99)
    model, optimizer, scheduler = build(config)
    iteration = checkpointing.load_model_weights(directory, model, config_dict=config_to_dict(config))
    loss = run_step(model, optimizer, scheduler, 5, train=False)
    try:
        checkpointing.load_checkpoint(directory, model, optimizer, scheduler, config_to_dict(config))
        refusal = None
    except checkpointing.CheckpointError as error:
        refusal = str(error)
    wrong = make_config(dropout=0.0, num_layers=4)
    try:
        checkpointing.load_model_weights(directory, build(wrong)[0], config_dict=config_to_dict(wrong))
        wrong_model = None
    except checkpointing.CheckpointError as error:
        wrong_model = str(error)
    return iteration, full_params(model), loss, refusal, wrong_model



@pytest.mark.parametrize("load_layout,common_layout", [
    ({"tensor_model_parallel_size": 2}, "common.pt"),
    ({"tensor_model_parallel_size": 2}, "common_state"),
    ({"pipeline_model_parallel_size": 2}, "common_state"),
], ids=["same_tp2-common.pt", "same_tp2-common_state", "other_pp2-common_state"])
def test_megatron_lm_weights_load_at_the_same_and_another_layout(dist_pool, tmp_path, load_layout, common_layout):
    """Both places megatron-core keeps the common items (common.pt up to 0.16, a common_state object from 0.17)
    are read under either installed release."""
    written = dist_pool(2).run(worker_write_as_megatron_lm, str(tmp_path), common_layout, tensor_model_parallel_size=2)
    reference_loss = next(loss for _, loss in written if loss is not None)
    loaded = dist_pool(2).run(worker_load_megatron_lm, str(tmp_path), **load_layout)
    for rank, (iteration, params, loss, refusal, wrong_model) in enumerate(loaded):
        assert iteration == ML_ITERATION
        if load_layout.get("tensor_model_parallel_size") == 2:
            assert_same_params(written[rank][0], params)
        if loss is not None:
            assert loss == pytest.approx(reference_loss, rel=1e-6)
        assert refusal is not None and "written by Megatron-LM, iteration 7, TP 2, PP 1" in refusal, refusal
        assert "--no-load-optim" in refusal and "latest_checkpointed_iteration" not in refusal
        assert wrong_model is not None and "num_layers: checkpoint 2, this run 4" in wrong_model, wrong_model
    assert any(loss is not None for _, _, loss, _, _ in loaded)


def worker_load_release(directory):
    """load_model_weights (as --finetune) of Megatron-LM's 'release' checkpoint; load_checkpoint's refusal."""
    config = make_config(dropout=0.0, seed=99)
    model, optimizer, scheduler = build(config)
    iteration = checkpointing.load_model_weights(directory, model, config_dict=config_to_dict(config))
    try:
        checkpointing.load_checkpoint(directory, model, optimizer, scheduler, config_to_dict(config),
                                      load_optimizer=False, load_rng=False)
        refusal = None
    except checkpointing.CheckpointError as error:
        refusal = str(error)
    return iteration, full_params(model), refusal


def test_megatron_lm_release_checkpoint_loads_its_weights_at_iteration_0(dist_pool, tmp_path):
    """Megatron-LM's converters write `release` into the tracker and the checkpoint into release/: its weights
    start a run (iteration 0), and resuming it is refused with the flag that starts from it."""
    written = dist_pool(2).run(worker_write_as_megatron_lm, str(tmp_path), "common_state", tensor_model_parallel_size=2)
    (tmp_path / f"iter_{ML_ITERATION:07d}").rename(tmp_path / "release")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    loaded = dist_pool(2).run(worker_load_release, str(tmp_path), tensor_model_parallel_size=2)
    for rank, (iteration, params, refusal) in enumerate(loaded):
        assert iteration == 0
        assert_same_params(written[rank][0], params)
        assert refusal is not None and "'release' checkpoint: weights only" in refusal and "--finetune" in refusal


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("tracked", ["7", "release"])
def test_megatron_lm_legacy_torch_format_is_refused_with_the_conversion(tmp_path, tracked):
    from megatron_mile.checkpointing.tracker import resolve_checkpoint_dir

    directory = tmp_path / ("release" if tracked == "release" else "iter_0000007")
    (directory / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(tracked)
    with pytest.raises(FileNotFoundError, match="legacy 'torch' format .*--ckpt-convert-format torch_dist"):
        resolve_checkpoint_dir(tmp_path, None, megatron_lm=True)
