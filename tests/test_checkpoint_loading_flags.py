"""Megatron-LM's loading and saving flags through a whole run (pretrain): --finetune, --pretrained-checkpoint,
--no-load-optim, --no-load-rng, --no-save-optim, --no-save-rng, --ckpt-step, --use-checkpoint-args.

Workers run in spawned gloo processes (tests/conftest.py: dist_pool) on the tiny run of checkpoint_cases.
"""

from __future__ import annotations

import pytest
from checkpoint_cases import LOOP_ARGS

from megatron_mile import checkpointing


def worker_pretrain(extra, world_size):
    """(losses, final iteration, consumed samples) of a tiny run with LOOP_ARGS + extra; or the error line."""
    from megatron_mile.arguments import parse_args
    from megatron_mile.training.loop import pretrain

    try:
        result = pretrain(parse_args(LOOP_ARGS + extra, world_size=world_size))
    except checkpointing.CheckpointError as error:
        return str(error)
    return [h.loss for h in result.history], result.final_iteration, result.consumed_samples


@pytest.fixture(scope="module")
def first_run(dist_pool, tmp_path_factory):
    """4 iterations saved at 2 and 4 (the uninterrupted run's losses)."""
    save = str(tmp_path_factory.mktemp("first") / "run")
    losses = dist_pool(2).run(worker_pretrain, ["--save", save, "--save-interval", "2"], 2)[-1][0]
    return save, losses


def test_finetune_starts_at_iteration_zero_from_the_weights(dist_pool, tmp_path, first_run):
    save, losses = first_run
    result = dist_pool(2).run(worker_pretrain, ["--load", save, "--finetune", "--ckpt-step", "2"], 2)[-1]
    history, final, consumed = result
    assert (len(history), final, consumed) == (4, 4, 16)  # all 4 iterations again, from sample 0
    # Iteration 3 of the first run trained the weights of iteration 2 on the batch of iteration 3; here the
    # weights of iteration 2 meet batch 1 with a fresh optimizer: a different loss, but not the untrained one.
    assert history[0] != losses[0]


def test_pretrained_checkpoint_is_used_only_while_load_is_empty(dist_pool, tmp_path, first_run):
    save, losses = first_run
    own = str(tmp_path / "own")
    flags = ["--load", own, "--save", own, "--pretrained-checkpoint", save, "--exit-interval", "2"]
    from_pretrained = dist_pool(2).run(worker_pretrain, flags, 2)[-1]
    finetuned = dist_pool(2).run(worker_pretrain, ["--load", save, "--finetune"], 2)[-1]
    assert from_pretrained[0] == finetuned[0][:2]  # the same weights (iteration 4's), from iteration 0
    resumed = dist_pool(2).run(worker_pretrain, flags[:-2], 2)[-1]
    assert resumed[0] == finetuned[0][2:]  # now --load's own checkpoint wins: iterations 3 and 4


def test_no_save_optim_needs_no_load_optim(dist_pool, tmp_path):
    save = str(tmp_path / "run")
    dist_pool(2).run(worker_pretrain, ["--save", save, "--exit-interval", "2", "--no-save-optim", "--no-save-rng"], 2)
    refused = dist_pool(2).run(worker_pretrain, ["--load", save], 2)[-1]
    assert isinstance(refused, str) and "--no-load-optim" in refused, refused
    resumed = dist_pool(2).run(worker_pretrain, ["--load", save, "--no-load-optim"], 2)[-1]
    assert resumed[1:] == (4, 16) and len(resumed[0]) == 2


def test_use_checkpoint_args_builds_the_checkpoint_model(dist_pool, tmp_path, first_run):
    save, _ = first_run
    # LOOP_ARGS' model has hidden size 64: 32 here would not load without --use-checkpoint-args.
    flags = ["--load", save, "--finetune", "--hidden-size", "32", "--ffn-hidden-size", "128"]
    refused = dist_pool(2).run(worker_pretrain, flags, 2)[-1]
    assert isinstance(refused, str) and "hidden_size: checkpoint 64, this run 32" in refused, refused
    history = dist_pool(2).run(worker_pretrain, flags + ["--use-checkpoint-args"], 2)[-1][0]
    assert len(history) == 4


def test_other_checkpoint_formats_are_refused_by_name():
    from megatron_mile.arguments import parse_args

    with pytest.raises(ValueError, match="--ckpt-format torch: only torch_dist"):
        parse_args(LOOP_ARGS + ["--ckpt-format", "torch"], world_size=2)
