"""The training loop: every parallel layout reproduces the single-process run, bad flags stop at start-up,
non-finite losses never reach the weights.

Runs pretrain() in spawned gloo processes (tests/conftest.py: dist_pool) on megatron-core's mock data.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


class _NanGradient(torch.autograd.Function):
    """Identity in forward; NaN gradient in backward: a finite loss whose gradient is not finite."""

    @staticmethod
    def forward(ctx, packed):
        return packed.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def run_with_nan_at(argv, world_size, bad_steps, poison="loss"):
    """Worker body: on the given steps (counted from 1) make the loss non-finite (poison="loss") or keep it
    finite with a NaN gradient (poison="gradient"), and train. Returns the (loss, skipped, grad norm) history
    or the reason training stopped."""
    from megatron_mile import model as model_module
    from megatron_mile.model import LOSS
    from megatron_mile.training.loop import TrainingStopped, pretrain

    original = model_module.MileGPTModel.compute_language_model_loss
    calls = {"n": 0}
    micro_batches = 4

    def poisoned(self, labels, logits):
        out = original(self, labels, logits)
        calls["n"] += 1
        step = (calls["n"] - 1) // micro_batches + 1
        if step in bad_steps:
            if poison == "loss":  # a NaN in the loss column of the packed per-token output
                out = out.index_fill(-1, torch.tensor([LOSS]), float("nan"))
            else:
                out = _NanGradient.apply(out)
        return out

    model_module.MileGPTModel.compute_language_model_loss = poisoned
    try:
        config = parse_args(argv, world_size=world_size)
        try:
            result = pretrain(config)
        except TrainingStopped as stop:
            return {"stopped": str(stop)}
        return {"history": [(r.loss, r.skipped, r.grad_norm) for r in result.history]}
    finally:
        model_module.MileGPTModel.compute_language_model_loss = original


def test_nan_gradient_with_a_finite_loss_skips_the_update(dist_pool):
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + ["--train-iters", "4"]
    poisoned = dist_pool(1).run(run_with_nan_at, argv, 1, {2}, "gradient")[0]["history"]
    assert [skipped for _, skipped, _ in poisoned] == [False, True, False, False]
    assert math.isfinite(poisoned[1][0]) and math.isnan(poisoned[1][2])  # finite loss, NaN gradient norm
    # The update was not applied: the run goes on exactly as one whose step-2 update was discarded for a NaN
    # loss (an applied NaN update would make every later loss NaN).
    nan_loss = dist_pool(1).run(run_with_nan_at, argv, 1, {2})[0]["history"]
    assert [loss for loss, _, _ in poisoned[2:]] == [loss for loss, _, _ in nan_loss[2:]]
    assert all(math.isfinite(loss) for loss, _, _ in poisoned[2:])


def test_a_run_whose_every_update_was_skipped_fails(dist_pool):
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + ["--train-iters", "3", "--max-skipped-iterations", "10"]
    out = dist_pool(1).run(run_with_nan_at, argv, 1, {1, 2, 3}, "gradient")[0]
    assert "all 3 iterations were skipped" in out["stopped"], out


def test_nan_loss_skips_the_update_and_training_goes_on(dist_pool):
    out = dist_pool(1).run(run_with_nan_at, TINY_LLAMA + LOSS_FLAGS["mile"] + ["--train-iters", "4"], 1, {2})[0]
    history = out["history"]
    assert [skipped for _, skipped, _ in history] == [False, True, False, False]
    assert math.isnan(history[1][0]) and all(math.isfinite(loss) for loss, _, _ in history[2:])


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
        (["--sequence-parallel", "--tensor-model-parallel-size", "2"], 2, "--sequence-parallel needs CUDA GPUs"),
        (["--loss-type", "mile", "--mile-sigma", "0"], 1, "--mile-sigma must be > 0"),
        (["--pipeline-model-parallel-size", "3"], 3, "does not divide --num-layers"),
        (["--lr-warmup-iters", "6", "--train-iters", "6"], 1, "--lr-warmup-iters 6 must be smaller than"),
        # Values that used to pass validation and fail later (or train on nonsense).
        (["--lr", "inf"], 1, "--lr must be a finite number"),
        (["--lr", "nan"], 1, "--lr must be a finite number"),
        (["--norm-epsilon=-1e-5"], 1, "--norm-epsilon must be > 0"),
        (["--rotary-base", "0"], 1, "--rotary-base must be >= 1"),
        (["--exit-interval", "0"], 1, "--exit-interval must be >= 1"),
        (["--ffn-hidden-size=-8"], 1, "--ffn-hidden-size must be >= 1"),
        (["--weight-decay=-0.1"], 1, "--weight-decay must be >= 0"),
        (["--init-method-std", "0"], 1, "--init-method-std must be > 0"),
        (["--max-position-embeddings", "16"], 1, "--max-position-embeddings 16 must be >= --seq-length"),
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


@pytest.mark.parametrize("rank", ["0", "1"])
def test_every_rank_that_stops_on_bad_flags_prints_its_reason(rank):
    # torchrun may kill rank 0 as soon as another rank exits: each rank must leave the reason itself.
    env = {k: v for k, v in os.environ.items()}
    env.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2")
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt_mile.py"), *TINY_LLAMA, "--focal-gamma", "3"],
        capture_output=True, text=True, cwd=REPO, timeout=120, env=env,
    )
    assert proc.returncode == 2
    assert f"error (rank {rank}):" in proc.stderr and "--focal-gamma needs --loss-type focal" in proc.stderr


def test_entry_script_rejects_unknown_flags():
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt_mile.py"), *TINY_LLAMA, "--no-such-flag"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr


def test_log_line_shows_rate_and_eta():
    from megatron_mile.loss import StepLoss
    from megatron_mile.training.reporting import format_duration, format_train_log

    stats = StepLoss(2.0, 2.1, 16.0, 16.0, 3.0, 1.0, 0.5, 1.5)
    line = format_train_log(10, 100, 160, 250.0, 1e-3, 16, stats, 0.5, 100.0, 0, 0, "mile", 4.0, 22.5)
    assert "| iterations per second: 4.000 |" in line and "| ETA: 0:00:22 |" in line
    assert format_duration(90061) == "1 days, 1:01:01" and format_duration(-3) == "0:00:00"


def test_a_launch_shows_no_python_warning_on_the_installed_release(tmp_path):
    """The launch a user types (a fresh process, Python's default warning filters): whatever megatron-core
    release is installed, its harmless Python warnings are hidden, and no other Python warning is printed (a
    new one from a release change fails here until it is understood). Log records are not checked."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MILE_SHOW_ALL_WARNINGS")}
    argv = [sys.executable, str(REPO / "pretrain_gpt_mile.py"), *TINY_LLAMA, "--train-iters", "2"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning_lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Warning: " in line]
    assert not warning_lines, warning_lines


def test_known_harmless_warnings_are_hidden_and_counted_and_others_still_show(tmp_path):
    """In a fresh process: megatron-core's known warnings (here: its optimizer's 'not installed' notice)
    are hidden and counted; an unknown warning still reaches stderr."""
    script = (
        "import warnings\n"
        "from megatron_mile import known_warnings\n"
        "assert known_warnings.install()\n"
        "import megatron.core.optimizer\n"
        "warnings.warn('something the user must see')\n"
        "print('hidden', known_warnings.hidden_count())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PYTHONWARNINGS", "MILE_SHOW_ALL_WARNINGS")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "something the user must see" in proc.stderr
    assert "not installed" not in proc.stderr
    assert int(proc.stdout.split()[-1]) >= 1
    shown = subprocess.run([sys.executable, "-c", script.replace("assert known_warnings.install()\n", "")],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert "not installed" in shown.stderr  # the same import warns without the filter: the test can fail
