"""Activation recomputation (--recompute-activations / --recompute-granularity ...): the same losses and the same
gradients as the run that keeps every activation, with dropout on, at TP 1, TP 2 and PP 2; and the flags'
start-up rules (Megatron-LM's).

Each run computes the gradients of two consecutive global batches (4 micro-batches each) without updating,
so a recomputation that replayed other dropout masks, or left the random streams elsewhere for the next
micro-batch, would show in the gradients or in the second batch's loss.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from tiny_model import LOSS_FLAGS, TINY_LLAMA

DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
RECOMPUTE = {
    "activations": ["--recompute-activations"],
    "selective_mlp": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
    "full_uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"],
    "full_block": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
}
# (flags, world size)
LAYOUTS = {"tp1": ([], 1), "tp2": (["--tensor-model-parallel-size", "2"], 2),
           "pp2": (["--pipeline-model-parallel-size", "2"], 2)}


def gradients_of_two_batches(argv, world_size):
    """Worker body: set the run up and compute the gradients of two global batches (no update); return each
    batch's (loss, lm_loss) and every parameter gradient this rank holds after each batch."""
    from megatron_mile.training.setup import setup_training
    from megatron_mile.training.step import compute_gradients

    setup = setup_training(parse_args(argv, world_size=world_size))
    batches = []
    for _ in range(2):
        stats = compute_gradients(setup)
        grads = {f"{index}.{name}": param.main_grad.detach().clone()
                 for index, chunk in enumerate(setup.model) for name, param in chunk.named_parameters()}
        batches.append({"loss": stats.loss, "lm_loss": stats.lm_loss, "grads": grads})
    return batches


def assert_same_gradients(per_rank, reference_per_rank, context):
    for ours_rank, ref_rank in zip(per_rank, reference_per_rank):
        for batch, (ours, ref) in enumerate(zip(ours_rank, ref_rank)):
            assert ours["loss"] == pytest.approx(ref["loss"], rel=0, abs=1e-6), (context, batch)
            assert ours["lm_loss"] == pytest.approx(ref["lm_loss"], rel=0, abs=1e-6), (context, batch)
            assert sorted(ours["grads"]) == sorted(ref["grads"])
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(ours["grads"][name], grad, rtol=0, atol=1e-6,
                                           msg=f"{context}, batch {batch}: gradient of {name}")


@pytest.fixture(scope="module")
def references(dist_pool):
    """Per layout: the run that keeps every activation (MiLe loss, dropout 0.1)."""
    runs = {}
    for layout, (flags, world_size) in LAYOUTS.items():
        runs[layout] = dist_pool(world_size).run(gradients_of_two_batches,
                                                 TINY_LLAMA + LOSS_FLAGS["mile"] + DROPOUT + flags, world_size)
    return runs


CASES = [("tp1", name) for name in RECOMPUTE] + [("tp2", "activations"), ("tp2", "full_uniform"),
                                                 ("pp2", "activations"), ("pp2", "full_block")]


@pytest.mark.parametrize("layout, recompute", CASES)
def test_recomputation_reproduces_losses_and_gradients(dist_pool, references, layout, recompute):
    flags, world_size = LAYOUTS[layout]
    argv = TINY_LLAMA + LOSS_FLAGS["mile"] + DROPOUT + flags + RECOMPUTE[recompute]
    per_rank = dist_pool(world_size).run(gradients_of_two_batches, argv, world_size)
    assert_same_gradients(per_rank, references[layout], (layout, recompute))


def test_dropout_is_on_so_the_comparison_can_fail(dist_pool, references):
    # Without dropout the gradients differ: the runs above really drew dropout masks (which the recomputation
    # had to replay).
    no_dropout = dist_pool(1).run(gradients_of_two_batches, TINY_LLAMA + LOSS_FLAGS["mile"], 1)[0]
    assert abs(no_dropout[0]["loss"] - references["tp1"][0][0]["loss"]) > 1e-4


def test_fused_lm_head_with_recomputation(dist_pool):
    base = TINY_LLAMA + LOSS_FLAGS["mile"] + DROPOUT + ["--fused-lm-head"]
    reference = dist_pool(1).run(gradients_of_two_batches, base, 1)
    for recompute in ("activations", "full_uniform"):
        per_rank = dist_pool(1).run(gradients_of_two_batches, base + RECOMPUTE[recompute], 1)
        assert_same_gradients(per_rank, reference, ("fused LM head", recompute))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform"],
         "--recompute-granularity full needs --recompute-num-layers"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "3"],
         "--recompute-method uniform needs --recompute-num-layers 3 to divide the 4 layers"),
        (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "5"],
         "--recompute-num-layers 5 exceeds the 4 layers"),
        (["--recompute-granularity", "selective", "--recompute-method", "uniform"],
         "selective recomputation .* takes no --recompute-method"),
        (["--recompute-activations", "--recompute-num-layers", "1"], "takes no --recompute-method / --recompute-num-layers"),
        (["--recompute-activations", "--recompute-granularity", "full", "--recompute-method", "block",
          "--recompute-num-layers", "1"], "--recompute-activations means --recompute-granularity selective"),
        (["--recompute-method", "block", "--recompute-num-layers", "1"], "apply to activation recomputation only"),
        (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
          "--recompute-modules", "mlp"], "--recompute-modules chooses what selective recomputation recomputes"),
        (["--recompute-activations", "--recompute-modules", "moe"], "recomputes part of mixture-of-experts layers"),
        (["--recompute-activations", "--recompute-modules", "mla_up_proj"], "multi-latent attention"),
        # megatron-core 0.16.1 recomputes the norms with a checkpoint that queries Transformer Engine.
        (["--recompute-activations", "--recompute-modules", "layernorm"],
         "--recompute-modules layernorm needs CUDA GPUs and Transformer Engine"),
    ],
)
def test_recompute_flags_are_checked_at_start_up(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY_LLAMA + extra, world_size=1)


def test_layernorm_recomputation_is_refused_with_fused_norms():
    from megatron_mile.kernels import KernelSupport

    flags = TINY_LLAMA + ["--transformer-impl", "transformer_engine", "--recompute-activations",
                          "--recompute-modules", "layernorm"]
    with pytest.raises(ConfigError, match="Transformer Engine fuses each norm into the linear layer"):
        parse_args(flags, world_size=1, gpu_available=True, kernel_support=KernelSupport.full((9, 0)))


def test_recompute_flags_reach_megatron_core():
    from megatron_mile.model.gpt import transformer_config

    selective = transformer_config(parse_args(TINY_LLAMA + ["--recompute-activations"], world_size=1))
    assert (selective.recompute_granularity, selective.recompute_modules) == ("selective", ["core_attn"])
    full = transformer_config(parse_args(TINY_LLAMA + RECOMPUTE["full_block"], world_size=1))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "block", 1)
    assert transformer_config(parse_args(TINY_LLAMA, world_size=1)).recompute_granularity is None
