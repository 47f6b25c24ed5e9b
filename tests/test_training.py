"""The training loop: every parallel layout reproduces the single-process run, bad flags stop at start-up,
non-finite losses never reach the weights.

Runs pretrain() in spawned gloo processes (tests/conftest.py: dist_pool) on megatron-core's mock data.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from tiny_model import LOSS_FLAGS, TINY_LLAMA

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2_virtual": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "dp2": [],
    "dp2_distributed_optimizer": ["--use-distributed-optimizer"],
}


def run_pretrain(argv, world_size):
    """Worker body: parse flags for this world size, train, return [(loss, lm_loss, grad_norm)] per step."""
    from megatron_mile.training.loop import pretrain

    config = parse_args(argv, world_size=world_size)
    result = pretrain(config)
    return [(r.loss, r.lm_loss, r.grad_norm, r.skipped) for r in result.history]


@pytest.fixture(scope="module")
def single_process_runs(dist_pool):
    """The reference: one process, 4 micro-batches of 2 per step, for each loss type."""
    return {
        loss: dist_pool(1).run(run_pretrain, TINY_LLAMA + flags, 1)[0] for loss, flags in LOSS_FLAGS.items()
    }


def assert_same_history(per_rank, reference, context, rel_tol=1e-5, grad_rel_tol=None):
    """Every rank's [(loss, lm_loss, grad_norm, skipped)] equals the reference's, step by step."""
    assert len(reference) == 3
    grad_rel_tol = rel_tol if grad_rel_tol is None else grad_rel_tol
    for rank_history in per_rank:  # every rank reports the same global numbers
        assert len(rank_history) == len(reference), context
        for step, (ours, ref) in enumerate(zip(rank_history, reference), start=1):
            loss_value, lm_loss, grad_norm, skipped = ours
            assert not skipped
            assert math.isclose(loss_value, ref[0], rel_tol=rel_tol, abs_tol=rel_tol), (context, step, ours, ref)
            assert math.isclose(lm_loss, ref[1], rel_tol=rel_tol, abs_tol=rel_tol), (context, step, ours, ref)
            assert math.isclose(grad_norm, ref[2], rel_tol=grad_rel_tol, abs_tol=rel_tol), (context, step, ours, ref)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("loss", list(LOSS_FLAGS))
def test_layout_reproduces_single_process(dist_pool, single_process_runs, loss, layout):
    per_rank = dist_pool(2).run(run_pretrain, TINY_LLAMA + LOSS_FLAGS[loss] + LAYOUTS[layout], 2)
    reference = single_process_runs[loss]
    assert_same_history(per_rank, reference, (loss, layout))
    # The loss types really differ (the comparison above would be vacuous otherwise).
    if loss != "cross_entropy":
        assert max(abs(a[0] - b[0]) for a, b in zip(reference, single_process_runs["cross_entropy"])) > 1e-3


# ------------------------------------------------------------------ the fused LM head (--fused-lm-head)

# (flags, world size): the fused head at TP 1, with the vocabulary split over 2 TP ranks, and on the last of
# 2 pipeline stages.
FUSED_LAYOUTS = {"tp1": ([], 1), "tp2": (LAYOUTS["tp2"], 2), "pp2": (LAYOUTS["pp2"], 2)}


@pytest.mark.parametrize("layout", list(FUSED_LAYOUTS))
@pytest.mark.parametrize("loss", list(LOSS_FLAGS))
def test_fused_lm_head_reproduces_the_unfused_run(dist_pool, single_process_runs, loss, layout):
    flags, world_size = FUSED_LAYOUTS[layout]
    argv = TINY_LLAMA + LOSS_FLAGS[loss] + flags + ["--fused-lm-head"]
    per_rank = dist_pool(world_size).run(run_pretrain, argv, world_size)
    assert_same_history(per_rank, single_process_runs[loss], ("fused", loss, layout))


def test_fused_lm_head_with_tied_embeddings_across_pipeline_stages(dist_pool):
    # Tied: the last stage's output weight is a copy of the first stage's embedding, kept equal by the
    # embedding-gradient all-reduce; the fused head's weight gradient must reach it like the unfused one.
    tied = [a for a in TINY_LLAMA if a != "--untie-embeddings-and-output-weights"] + LOSS_FLAGS["mile"]
    reference = dist_pool(1).run(run_pretrain, tied, 1)[0]
    per_rank = dist_pool(2).run(run_pretrain, tied + LAYOUTS["pp2"] + ["--fused-lm-head"], 2)
    assert_same_history(per_rank, reference, ("fused", "tied", "pp2"))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_lm_head"])
def test_bf16_training_follows_the_fp32_run(dist_pool, single_process_runs, fused):
    # bf16 weights and activations, fp32 loss statistics and main weights: 3 steps stay within bf16
    # rounding of the fp32 run (seen: loss within 3e-3, grad norm within 9e-3 relative).
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + ["--bf16"] + (["--fused-lm-head"] if fused else [])
    history = dist_pool(1).run(run_pretrain, argv, 1)
    assert_same_history(history, single_process_runs["mile"], ("bf16", fused), rel_tol=1e-2, grad_rel_tol=3e-2)


def run_with_nan_at(argv, world_size, bad_steps):
    """Worker body: make the loss non-finite on the given steps (counted from 1) and train."""
    import torch

    from megatron_mile import model as model_module
    from megatron_mile.training.loop import TrainingStopped, pretrain

    original = model_module.MileGPTModel.compute_language_model_loss
    calls = {"n": 0}
    micro_batches = 4

    def poisoned(self, labels, logits):
        out = original(self, labels, logits)
        calls["n"] += 1
        step = (calls["n"] - 1) // micro_batches + 1
        if step in bad_steps:
            out = out * torch.tensor([float("nan"), 1.0, 1.0])
        return out

    model_module.MileGPTModel.compute_language_model_loss = poisoned
    try:
        config = parse_args(argv, world_size=world_size)
        try:
            result = pretrain(config)
        except TrainingStopped as stop:
            return {"stopped": str(stop)}
        return {"history": [(r.loss, r.skipped) for r in result.history]}
    finally:
        model_module.MileGPTModel.compute_language_model_loss = original


def test_nan_loss_skips_the_update_and_training_goes_on(dist_pool):
    out = dist_pool(1).run(run_with_nan_at, TINY_LLAMA + LOSS_FLAGS["mile"] + ["--train-iters", "4"], 1, {2})[0]
    history = out["history"]
    assert [skipped for _, skipped in history] == [False, True, False, False]
    assert math.isnan(history[1][0]) and all(math.isfinite(loss) for loss, _ in history[2:])


def test_repeated_nan_losses_stop_training_with_a_clear_message(dist_pool):
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + ["--train-iters", "6", "--max-skipped-iterations", "2"]
    out = dist_pool(1).run(run_with_nan_at, argv, 1, {2, 3, 4})[0]
    assert "2 consecutive iterations had a non-finite loss" in out["stopped"]


# ------------------------------------------------------------------ bad flags: one clear message, exit 2


@pytest.mark.parametrize(
    "extra, world_size, message",
    [
        (["--tensor-model-parallel-size", "3"], 3, "does not divide --num-attention-heads"),
        (["--tensor-model-parallel-size", "2"], 3, "not divisible by TP * PP"),
        (["--global-batch-size", "6"], 2, "not divisible by --micro-batch-size * DP"),
        (["--mile-gamma", "2"], 1, "--mile-gamma needs --loss-type mile"),
        (["--focal-gamma", "2", "--loss-type", "mile"], 1, "--focal-gamma needs --loss-type focal"),
        (["--sequence-parallel"], 1, "--sequence-parallel needs CUDA GPUs"),
        (["--loss-type", "mile", "--mile-sigma", "0"], 1, "--mile-sigma must be > 0"),
        (["--pipeline-model-parallel-size", "3"], 3, "does not divide --num-layers"),
        (["--lr-warmup-iters", "6", "--train-iters", "6"], 1, "--lr-warmup-iters 6 must be smaller than"),
    ],
)
def test_bad_flag_combinations_are_rejected_with_the_fix(extra, world_size, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("-", r"\-")):
        parse_args(TINY_LLAMA + extra, world_size=world_size, gpu_available=False)


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as error:
        parse_args(TINY_LLAMA + ["--mile-gamma", "1", "--global-batch-size", "3"], world_size=1)
    assert "--mile-gamma" in str(error.value) and "--global-batch-size" in str(error.value)


def test_entry_script_exits_2_with_one_message_on_bad_flags():
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt_mile.py"), *TINY_LLAMA, "--focal-gamma", "3"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "--focal-gamma needs --loss-type focal" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_entry_script_rejects_unknown_flags():
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt_mile.py"), *TINY_LLAMA, "--no-such-flag"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr
