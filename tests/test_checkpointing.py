"""Checkpoints: exact resume, atomic saves, refusal of NaN weights, clear errors, safe loading, and loading
at another TP/PP layout than the one saved.

Worker functions run in spawned gloo processes (tests/conftest.py: dist_pool) on a small MileGPTModel
(2 layers, hidden 64, 4 heads, sequence 16, vocabulary 100) fed random token batches.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_cases import (
    LOOP_ARGS,
    assert_same,
    assert_same_rng,
    build,
    full_params,
    make_config,
    optimizer_tensors,
    rng_snapshot,
    run_step,
)

from megatron_mile import checkpointing
from megatron_mile.arguments import config_from_dict, config_to_dict, parse_args
from megatron_mile.checkpointing import save as checkpoint_save
from megatron_mile.checkpointing import safe_load

# ----------------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------------


def worker_resume_exact(directory, distributed_optimizer, bf16=False):
    config = make_config(distributed_optimizer=distributed_optimizer, bf16=bf16)
    config_dict = config_to_dict(config)
    model, optimizer, scheduler = build(config)
    run_step(model, optimizer, scheduler, 1)
    params, opt_state, sched_state = full_params(model), optimizer_tensors(optimizer), scheduler.state_dict()
    rng = rng_snapshot()
    path = checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 8, config_dict)
    # Uninterrupted continuation (dropout on: the next loss depends on the RNG states too).
    reference_loss = run_step(model, optimizer, scheduler, 2)
    reference_params = full_params(model)

    # A fresh model from another seed, with the RNGs moved on: only loading can make them agree.
    other = make_config(distributed_optimizer=distributed_optimizer, seed=99, bf16=bf16)
    model2, optimizer2, scheduler2 = build(other)
    random.random(), np.random.rand(), torch.rand(3)
    before = full_params(model2)
    assert any(not torch.equal(before[k], params[k]) for k in params)
    iteration, consumed = checkpointing.load_checkpoint(directory, model2, optimizer2, scheduler2, config_dict)
    assert (iteration, consumed) == (1, 8)
    assert_same(params, full_params(model2), "parameters")
    assert_same(opt_state, optimizer_tensors(optimizer2), "optimizer state")
    assert scheduler2.state_dict() == sched_state
    assert scheduler2.num_steps == scheduler.num_steps - 1
    assert_same_rng(rng, rng_snapshot())
    resumed_loss = run_step(model2, optimizer2, scheduler2, 2)
    assert_same(reference_params, full_params(model2), "parameters after the next step")
    return path, reference_loss, resumed_loss


@pytest.mark.parametrize(
    "world,layout,distributed_optimizer,bf16",
    [
        (1, {}, False, False),
        (1, {}, False, True),  # bf16 weights with fp32 main weights in the optimizer
        (2, {"tensor_model_parallel_size": 2}, False, False),
        (2, {"pipeline_model_parallel_size": 2}, False, False),
        (2, {}, True, False),  # DP 2, distributed optimizer (state sharded over DP)
    ],
    ids=["single", "bf16", "tp2", "pp2", "dp2_distributed_optimizer"],
)
def test_resume_is_exact(dist_pool, tmp_path, world, layout, distributed_optimizer, bf16):
    results = dist_pool(world).run(worker_resume_exact, str(tmp_path), distributed_optimizer, bf16, **layout)
    path = Path(results[0][0])
    assert path == tmp_path / "iter_0000001"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in (path / "rng").iterdir()) == [f"rank_{r:05d}.pt" for r in range(world)]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    for _, reference_loss, resumed_loss in results:
        assert resumed_loss == reference_loss  # exactly: same bits, not just close
    assert any(r[1] is not None for r in results)


# ----------------------------------------------------------------------------------------------------------
# Atomic saves, NaN refusal
# ----------------------------------------------------------------------------------------------------------


class SimulatedCrash(RuntimeError):
    pass


def _crash(tmp):
    raise SimulatedCrash(f"crash after writing {tmp}")


def worker_interrupted_save(directory):
    config = make_config(dropout=0.0)
    config_dict = config_to_dict(config)
    model, optimizer, scheduler = build(config)
    run_step(model, optimizer, scheduler, 1)
    checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 2, config_dict)
    saved = full_params(model)
    run_step(model, optimizer, scheduler, 2)
    original = checkpoint_save._before_commit
    checkpoint_save._before_commit = _crash
    try:
        with pytest.raises(SimulatedCrash):
            checkpointing.save_checkpoint(directory, 2, model, optimizer, scheduler, 4, config_dict)
    finally:
        checkpoint_save._before_commit = original
    import torch.distributed as dist

    dist.barrier()
    leftovers = sorted(p.name for p in Path(directory).iterdir())
    latest = checkpointing.read_latest_iteration(directory)

    model2, optimizer2, scheduler2 = build(make_config(dropout=0.0, seed=5))
    iteration, consumed = checkpointing.load_checkpoint(directory, model2, optimizer2, scheduler2, config_dict)
    assert (iteration, consumed) == (1, 2)
    assert_same(saved, full_params(model2), "parameters of the last complete checkpoint")

    # The next successful save clears the leftover temp directory.
    checkpointing.save_checkpoint(directory, 3, model, optimizer, scheduler, 6, config_dict)
    after = sorted(p.name for p in Path(directory).iterdir())
    return leftovers, latest, after


def test_interrupted_save_keeps_previous_checkpoint(dist_pool, tmp_path):
    leftovers, latest, after = dist_pool(2).run(worker_interrupted_save, str(tmp_path), tensor_model_parallel_size=2)[0]
    assert latest == 1
    assert "iter_0000002" not in leftovers
    temp = [name for name in leftovers if name.startswith("iter_0000002.tmp-")]
    assert len(temp) == 1, leftovers  # the crash happened after the files were written
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert after == ["iter_0000001", "iter_0000003", "latest_checkpointed_iteration.txt"]


def worker_nan_refused(directory):
    import torch.distributed as dist

    config = make_config()
    model, optimizer, scheduler = build(config)
    if dist.get_rank() == 1:  # only one rank holds the bad value; both must refuse
        chunk = model[0].module
        next(iter(chunk.decoder.parameters())).data.view(-1)[3] = float("nan")
    with pytest.raises(checkpointing.CheckpointError) as raised:
        checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 2, config_to_dict(config))
    return str(raised.value)


def test_nan_weights_are_never_saved(dist_pool, tmp_path):
    messages = dist_pool(2).run(worker_nan_refused, str(tmp_path / "save"), tensor_model_parallel_size=2)
    for message in messages:
        assert "non-finite" in message and "[1]" in message
    assert "decoder" in messages[1]
    assert not (tmp_path / "save").exists() or not list((tmp_path / "save").iterdir())


# ----------------------------------------------------------------------------------------------------------
# Another layout than the saved one
# ----------------------------------------------------------------------------------------------------------


def worker_save_reference(directory):
    """TP 1: train 2 steps, save, report the eval loss of batch 9 and the loss of one more training step."""
    config = make_config(dropout=0.0)
    model, optimizer, scheduler = build(config)
    fresh_eval = run_step(model, optimizer, scheduler, 9, train=False)
    run_step(model, optimizer, scheduler, 1)
    run_step(model, optimizer, scheduler, 2)
    checkpointing.save_checkpoint(directory, 2, model, optimizer, scheduler, 4, config_to_dict(config))
    trained_eval = run_step(model, optimizer, scheduler, 9, train=False)
    run_step(model, optimizer, scheduler, 3)
    after_step_eval = run_step(model, optimizer, scheduler, 9, train=False)
    return fresh_eval, trained_eval, after_step_eval


def worker_load_other_layout(directory):
    config = make_config(dropout=0.0)
    model, optimizer, scheduler = build(config)
    fresh_eval = run_step(model, optimizer, scheduler, 9, train=False)
    iteration, _ = checkpointing.load_checkpoint(directory, model, optimizer, scheduler, config_to_dict(config))
    assert iteration == 2
    loaded_eval = run_step(model, optimizer, scheduler, 9, train=False)
    run_step(model, optimizer, scheduler, 3)  # the optimizer state was resharded too
    after_step_eval = run_step(model, optimizer, scheduler, 9, train=False)
    return fresh_eval, loaded_eval, after_step_eval


@pytest.fixture(scope="module")
def tp1_checkpoint(dist_pool, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tp1")
    return directory, dist_pool(1).run(worker_save_reference, str(directory))[0]


@pytest.mark.parametrize(
    "layout",
    [{"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}],
    ids=["tp1_to_tp2", "tp1_to_pp2"],
)
def test_checkpoint_loads_at_another_layout(dist_pool, tp1_checkpoint, layout):
    directory, (fresh_ref, trained_ref, after_step_ref) = tp1_checkpoint
    results = [r for r in dist_pool(2).run(worker_load_other_layout, str(directory), **layout) if r[0] is not None]
    assert results
    for fresh, loaded, after_step in results:
        # Same initial model at both layouts, so the loaded one must differ from it and match the trained one.
        assert math.isclose(fresh, fresh_ref, rel_tol=1e-5)
        assert not math.isclose(loaded, fresh, rel_tol=1e-3)
        assert math.isclose(loaded, trained_ref, rel_tol=1e-5), (loaded, trained_ref)
        assert math.isclose(after_step, after_step_ref, rel_tol=1e-5), (after_step, after_step_ref)


def worker_distributed_optimizer_save(directory):
    config = make_config(dropout=0.0, distributed_optimizer=True)
    model, optimizer, scheduler = build(config)
    run_step(model, optimizer, scheduler, 1)
    checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 2, config_to_dict(config))
    return run_step(model, optimizer, scheduler, 9, train=False)


def worker_distributed_optimizer_load(directory, distributed_optimizer):
    config = make_config(dropout=0.0, distributed_optimizer=distributed_optimizer)
    model, optimizer, scheduler = build(config)
    with pytest.raises(ValueError) as raised:
        checkpointing.load_checkpoint(directory, model, optimizer, scheduler, config_to_dict(config))
    # The weights alone load at any layout.
    checkpointing.load_checkpoint(directory, model, optimizer, scheduler, config_to_dict(config),
                                  load_optimizer=False)
    return str(raised.value), run_step(model, optimizer, scheduler, 9, train=False)


def test_distributed_optimizer_state_needs_saved_layout(dist_pool, tmp_path):
    reference = dist_pool(2).run(worker_distributed_optimizer_save, str(tmp_path))[0]
    per_rank = dist_pool(2).run(worker_distributed_optimizer_load, str(tmp_path), True, tensor_model_parallel_size=2)
    message, loss = per_rank[0]
    assert "saved at TP=1, PP=1, VPP=1" in message and "this run uses TP=2, PP=1, VPP=1" in message
    assert math.isclose(loss, reference, rel_tol=1e-5)
    message, _ = dist_pool(1).run(worker_distributed_optimizer_load, str(tmp_path), False)[0]
    assert "distributed/dp_reshardable optimizer state" in message and "standard" in message


# ----------------------------------------------------------------------------------------------------------
# Mismatching models, weights-only loading, saved config
# ----------------------------------------------------------------------------------------------------------


def worker_mismatch_and_tools(directory):
    config = make_config()
    config_dict = config_to_dict(config)
    model, optimizer, scheduler = build(config)
    run_step(model, optimizer, scheduler, 1)
    checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 2, config_dict, extra={"note": "x"})

    other = make_config(num_layers=3, hidden_size=128)
    with pytest.raises(ValueError) as raised:
        checkpointing.load_checkpoint(directory, model, optimizer, scheduler, config_to_dict(other))
    mismatch = str(raised.value)

    # Export/eval path: rebuild the model from the saved config alone, load only the weights.
    saved = checkpointing.read_saved_config(directory)
    rebuilt = config_from_dict(saved)
    model2, _, _ = build(rebuilt)
    assert checkpointing.load_model_weights(directory, model2, config_dict=saved) == 1
    assert_same(full_params(model), full_params(model2), "weights-only load")
    extra = checkpointing.read_checkpoint_metadata(directory)["extra"]
    return mismatch, saved == config_dict, extra


def test_mismatching_model_and_weights_only_load(dist_pool, tmp_path):
    mismatch, config_round_trips, extra = dist_pool(1).run(worker_mismatch_and_tools, str(tmp_path))[0]
    assert "num_layers: checkpoint 2, this run 3" in mismatch
    assert "hidden_size: checkpoint 64, this run 128" in mismatch
    assert "ffn_hidden_size" in mismatch and "num_attention_heads" not in mismatch
    assert config_round_trips
    assert extra == {"note": "x"}
    assert json.loads((tmp_path / "iter_0000001" / "mile_checkpoint.json").read_text())["iteration"] == 1


def worker_tampered_metadata(directory):
    config = make_config()
    model, optimizer, scheduler = build(config)
    with pytest.raises(ValueError) as raised:
        checkpointing.load_checkpoint(directory, model, optimizer, scheduler, config_to_dict(config))
    return str(raised.value)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_tampered_checkpoint_runs_no_code(dist_pool, tmp_path):
    # Take a real checkpoint and replace its pickled tensor metadata with one that would run code.
    directory = tmp_path / "ckpt"
    dist_pool(1).run(worker_save_reference, str(directory))
    marker = tmp_path / "code_ran"
    (directory / "iter_0000002" / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    message = dist_pool(1).run(worker_tampered_metadata, str(directory))[0]
    assert "posix.mkdir" in message or "os.mkdir" in message, message
    assert not marker.exists()


def test_metadata_unpickler_refuses_code():
    payload = pickle.dumps(_RunsCode("/nonexistent/never"))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_load.MetadataUnpickler(__import__("io").BytesIO(payload)).load()


# Errors before anything is loaded need no processes.


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpointing.load_checkpoint(tmp_path / "nope", None, None, None, {})


def test_empty_directory_starts_from_scratch(tmp_path, capsys):
    assert checkpointing.load_checkpoint(tmp_path, None, None, None, {}) == (0, 0)
    assert "training from scratch" in capsys.readouterr().out
    assert checkpointing.read_latest_iteration(tmp_path) is None


@pytest.mark.parametrize("content", ["", "abc", "-3", "12x", "1.5"])
def test_corrupt_latest_file(tmp_path, content):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(content)
    with pytest.raises(ValueError, match="corrupt"):
        checkpointing.read_latest_iteration(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path)):
        checkpointing.load_checkpoint(tmp_path, None, None, None, {})


def test_latest_names_missing_iteration(tmp_path):
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "iter_0000004" / "mile_checkpoint.json").write_text("{}")
    (tmp_path / "iter_0000009.tmp-abc123").mkdir()  # a crashed save: never offered
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(FileNotFoundError) as raised:
        checkpointing.load_checkpoint(tmp_path, None, None, None, {})
    assert "iter_0000007" in str(raised.value) and "iter_0000004" in str(raised.value)
    assert "iter_0000009" not in str(raised.value)


def test_checkpoints_without_latest_file(tmp_path):
    (tmp_path / "iter_0000004").mkdir()
    with pytest.raises(FileNotFoundError, match="no latest_checkpointed_iteration.txt"):
        checkpointing.load_checkpoint(tmp_path, None, None, None, {})


# ----------------------------------------------------------------------------------------------------------
# Through the training loop
# ----------------------------------------------------------------------------------------------------------

def worker_pretrain(extra, world_size):
    from megatron_mile.training.loop import pretrain

    result = pretrain(parse_args(LOOP_ARGS + extra, world_size=world_size))
    return [h.loss for h in result.history], result.final_iteration, result.consumed_samples


def test_pretrain_resume_matches_uninterrupted_run(dist_pool, tmp_path):
    """DP 2 with dropout: stop at iteration 2 (--exit-interval), resume with --load, same losses bit for bit."""
    pool, save = dist_pool(2), str(tmp_path / "run")
    full = pool.run(worker_pretrain, [], 2)[-1]
    first = pool.run(worker_pretrain, ["--save", save, "--exit-interval", "2"], 2)[-1]
    second = pool.run(worker_pretrain, ["--save", save, "--load", save], 2)[-1]
    assert first == (full[0][:2], 2, 8)
    assert second == (full[0][2:], 4, 16)
    assert checkpointing.read_latest_iteration(save) == 4
