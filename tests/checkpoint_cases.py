"""Shared pieces of the checkpoint tests: a small MileGPTModel run config, its model/optimizer/scheduler, one
training step on fixed random batches through megatron's schedules, and exact comparisons of parameters,
optimizer state and RNG states. Everything here runs inside the spawned gloo workers (tests/conftest.py).
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
from megatron.core.utils import unwrap_model

from megatron_mile import checkpointing
from tiny_model import build_tiny_model, mock_data_flags, model_flags, tiny_config

VOCAB = 100
SEQ = 16
BATCH = 2


def make_config(dropout=0.1, distributed_optimizer=False, seed=1234, num_layers=2, hidden_size=64, bf16=False,
                disable_bias_linear=False, extra_flags=()):
    """A small GPT (LayerNorm, GeLU) at this worker's layout, trained with a cosine schedule; `extra_flags`
    come last (they win over the defaults here)."""
    flags = model_flags(num_layers, hidden_size, seq_length=SEQ, llama=False, untie_embeddings=False,
                        dropout=dropout) + mock_data_flags(VOCAB)
    # 100 tokens pad to 128 rows at TP 1 and 2 alike, so layouts can exchange checkpoints.
    flags += ["--make-vocab-size-divisible-by", "64", "--lr", "1e-2", "--lr-warmup-iters", "2",
              "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--seed", str(seed), "--train-iters", "10",
              "--micro-batch-size", "1"]
    flags += ["--disable-bias-linear"] * disable_bias_linear + ["--use-distributed-optimizer"] * distributed_optimizer
    return tiny_config(flags + ["--bf16"] * bf16 + list(extra_flags))


def build(config):
    """Model chunks (DDP-wrapped), optimizer and scheduler, seeded as a run does."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    from megatron_mile.training.initialize import set_random_seeds
    from megatron_mile.training.optimizer import build_optimizer, wrap_for_training

    chunks = build_tiny_model(config, VOCAB)
    set_random_seeds(config.training.seed)
    model = wrap_for_training(config, chunks)
    optimizer, scheduler = build_optimizer(config, model)
    tf_config = get_model_config(model[0])
    tf_config.grad_scale_func = optimizer.scale_loss
    tf_config.no_sync_func = model[0].no_sync
    tf_config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler


def batch(step):
    """A fixed random batch per step, drawn from its own generator (the global RNGs stay untouched)."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ).contiguous()
    return {"tokens": tokens, "labels": labels, "position_ids": positions}


def _forward_step(losses, data_iterator, model):
    data = next(data_iterator)
    labels = data["labels"] if unwrap_model(model).post_process else None
    output = model(data["tokens"], data["position_ids"], None, labels=labels)

    def loss_func(output_tensor):
        ce_sum = output_tensor[..., 0].sum()
        losses.append(float(ce_sum.detach()))
        return ce_sum, torch.tensor(output_tensor[..., 0].numel(), dtype=torch.int), {}

    return output, loss_func


def run_step(model, optimizer, scheduler, step, train=True, samples_per_step=1):
    """One forward(-backward-update) on batch(step) through megatron's schedules; the loss (ce sum) on
    the last pipeline stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = []
    if train:
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    else:
        for chunk in model:
            chunk.eval()
    with torch.set_grad_enabled(train):
        get_forward_backward_func()(
            forward_step_func=partial(_forward_step, losses),
            data_iterator=iter([batch(step)]),
            model=model,
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=not train,
        )
    if train:
        ok, _, _ = optimizer.step()
        assert ok
        scheduler.step(increment=samples_per_step)  # the schedule counts samples: the run's global batch
    else:
        for chunk in model:
            chunk.train()
    return losses[0] if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None


def full_params(model):
    """{name: this rank's tensor} of the unwrapped chunks."""
    out = {}
    for index, chunk in enumerate(unwrap_model(model)):
        for name, param in chunk.named_parameters():
            out[f"{index}.{name}"] = param.detach().clone()
    return out


def optimizer_tensors(optimizer):
    """Flat {path: tensor or value} of the optimizer's state dict (Adam moments, steps, param groups)."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value.detach().clone()
        else:
            flat[prefix] = value

    walk("optimizer", optimizer.state_dict())
    return flat


def assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b)))
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
        else:
            assert a[key] == b[key], f"{what}: {key}: {a[key]!r} != {b[key]!r}"


def rng_snapshot():
    state = checkpointing.get_rng_state()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "torch": state["torch_cpu"].clone(),
        "tracker": {k: v.clone() for k, v in state["tracker"].items()},
    }


def assert_same_rng(a, b):
    assert a["python"] == b["python"]
    assert np.array_equal(a["numpy"], b["numpy"])
    assert torch.equal(a["torch"], b["torch"])
    assert a["tracker"].keys() == b["tracker"].keys()
    for key in a["tracker"]:
        assert torch.equal(a["tracker"][key], b["tracker"][key]), key


# ----------------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------------


# pretrain() flags of a tiny run (DP over the pool's ranks, dropout on, mock data) for the loop-level tests.
LOOP_ARGS = model_flags(2, 64, seq_length=SEQ, llama=False, untie_embeddings=False, dropout=0.1) + mock_data_flags(
    VOCAB) + ("--eval-iters 0 --micro-batch-size 2 --global-batch-size 4 --log-interval 100 --no-progress --lr 1e-3 "
              "--train-iters 4 --seed 3").split()


# The per-iteration columns of {save}/summary.json that two runs of the same training share ("seconds" is
# wall time), and the checkpoint the tracker names: what resume tests compare.
COMPARED_COLUMNS = ("iteration", "lm_loss", "loss", "skipped")


def summary_history(save) -> dict:
    """{column: values} of the run summary in directory `save`, for COMPARED_COLUMNS."""
    summary = json.loads((Path(save) / "summary.json").read_text())
    return {column: summary["history"][column] for column in COMPARED_COLUMNS}


def latest_iteration(save) -> int:
    """The iteration latest_checkpointed_iteration.txt in `save` names."""
    return int((Path(save) / checkpointing.TRACKER_FILENAME).read_text())



# ----------------------------------------------------------------------------------------------------------
# Checkpoints as megatron-core releases write them
# ----------------------------------------------------------------------------------------------------------

# Where a torch_dist checkpoint keeps its common (non-sharded) items: megatron-core <= 0.16's
# dist_checkpointing.save writes them into common.pt; 0.17+ writes a ShardedObject "common_state" (global
# shape (1,), offset (0,), replica_id = the global rank) among the shards instead (0.19's serialization.save).
COMMON_LAYOUTS = ("common.pt", "common_state")


def native_common_layout() -> str:
    """The layout the installed release's own dist_checkpointing.save writes."""
    from importlib.metadata import version

    from packaging.version import Version

    return "common_state" if Version(version("megatron-core")) >= Version("0.17") else "common.pt"


def save_as_megatron_core(state: dict, path: Path, content_metadata: dict, common_layout: str) -> None:
    """Every rank: `state` saved into `path` (which exists) as megatron-core's dist_checkpointing.save does, with
    its common items in `common_layout`. The installed release's own layout is its save itself; the other one
    is built from the same steps that release's save takes (save_preprocess splits the common items off, then
    the torch_dist shards, the common part where that release puts it, the format tag), so that both layouts
    are read under either release, as users' checkpoints of both ages are."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    from megatron_mile.checkpointing.torch_dist import _InProcessTorchDistSaveStrategy

    strategy = _InProcessTorchDistSaveStrategy()
    rank = torch.distributed.get_rank()
    if common_layout == native_common_layout():
        dist_checkpointing.save(state, str(path), sharded_strategy=strategy, content_metadata=content_metadata)
        return
    sharded, common = save_preprocess({**state, "content_metadata": content_metadata})
    if common_layout == "common_state":  # 0.17+ under 0.16.1
        sharded["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=rank)
    strategy.save(sharded, Path(path))
    if rank == 0:
        if common_layout == "common.pt":  # 0.16 under 0.17+
            torch.save(common, Path(path) / "common.pt")
        save_config(CheckpointingConfig("torch_dist", 1), str(path))
    torch.distributed.barrier()


def common_layout_of(path: Path) -> str:
    """Which layout checkpoint directory `path` keeps its common items in (read from its file names and its
    torch .metadata, with the project's safe unpickler)."""
    from megatron_mile.checkpointing import safe_load

    if (Path(path) / "common.pt").is_file():
        return "common.pt"
    keys = safe_load.load_checkpoint_metadata(Path(path) / ".metadata").state_dict_metadata
    return "common_state" if "common_state/shard_0_1" in keys else "none"
