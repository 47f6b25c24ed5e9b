"""Overlapped gradient reduction and parameter gathering (--overlap-grad-reduce, --overlap-param-gather,
--ddp-bucket-size) keep the exact weighted loss: DP 2 (with and without the distributed optimizer) and
DP 2 x PP 2 reproduce the single-process run for every loss type (losses and gradient norms to 1e-5 over
3 steps), with buckets small enough that several exist (on the first pipeline stage: megatron does not
bucket the others) and reductions really start before the step's finalize.

Why it must hold (docs/scale.md): the weight sum W of the step is known only after the last micro-batch,
but the buckets reduce plain sums of sum(w * ce) gradients, which need no W; megatron's finalize waits for
every bucket and only then divides once by the global W.
"""

from __future__ import annotations

import pytest

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from tiny_model import LOSS_FLAGS, TINY_LLAMA

# ~312k parameters in the tiny LLaMA: buckets of 40k parameters give several per model chunk.
OVERLAP = ["--overlap-grad-reduce", "--ddp-bucket-size", "40000"]
LAYOUTS = {
    "dp2": (OVERLAP, 2),
    "dp2_distributed_optimizer": (OVERLAP + ["--use-distributed-optimizer", "--overlap-param-gather"], 2),
    "dp2_pp2": (OVERLAP + ["--pipeline-model-parallel-size", "2"], 4),
}


def train_three_steps(argv, world_size):
    """Worker body: 3 training steps; per step (loss, lm_loss, grad norm), the number of gradient buckets on
    this rank and how many bucket reductions started before the step's finalize (i.e. during backward)."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    from megatron_mile.training.setup import setup_training
    from megatron_mile.training.step import train_step

    setup = setup_training(parse_args(argv, world_size=world_size))
    state = {"finalizing": False, "early_launches": 0}
    for chunk in setup.model:
        for group in chunk.bucket_groups:
            def counted(*args, _launch=group.start_grad_sync, **kwargs):
                state["early_launches"] += not state["finalizing"]
                return _launch(*args, **kwargs)

            group.start_grad_sync = counted
    schedule_config = get_model_config(setup.model[0])
    finalize = schedule_config.finalize_model_grads_func

    def finalize_and_mark(*args, **kwargs):
        state["finalizing"] = True
        try:
            return finalize(*args, **kwargs)
        finally:
            state["finalizing"] = False

    schedule_config.finalize_model_grads_func = finalize_and_mark
    history = []
    for _ in range(3):
        step = train_step(setup)
        history.append((step.stats.loss, step.stats.lm_loss, step.grad_norm, step.skipped))
    return {"history": history, "buckets": sum(len(chunk.bucket_groups) for chunk in setup.model),
            "early_launches": state["early_launches"],
            "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank()}


@pytest.fixture(scope="module")
def single_process_runs(dist_pool):
    return {loss: dist_pool(1).run(train_three_steps, TINY_LLAMA + flags, 1)[0] for loss, flags in LOSS_FLAGS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("loss", list(LOSS_FLAGS))
def test_overlapped_reduction_reproduces_the_single_process_run(dist_pool, single_process_runs, loss, layout):
    flags, world_size = LAYOUTS[layout]
    per_rank = dist_pool(world_size).run(train_three_steps, TINY_LLAMA + LOSS_FLAGS[loss] + flags, world_size)
    reference = single_process_runs[loss]
    assert reference["early_launches"] == 0  # without overlap every reduction waits for finalize
    for rank in per_rank:
        # megatron buckets the first pipeline stage only (the others reduce off the critical path).
        if rank["pipeline_rank"] == 0:
            assert rank["buckets"] > 1, "the bucket size must split the gradients into several buckets"
        assert rank["early_launches"] > 0, "with overlap, bucket reductions start during backward"
        for step, (ours, ref) in enumerate(zip(rank["history"], reference["history"]), start=1):
            assert not ours[3]
            for value, expected in zip(ours[:3], ref[:3]):
                assert value == pytest.approx(expected, rel=1e-5, abs=1e-5), (loss, layout, step, ours, ref)


def test_unaligned_reduction_with_the_distributed_optimizer_across_pipeline_stages(dist_pool, single_process_runs):
    # Each stage launches its buckets during its own backward (--no-align-grad-reduce); the distributed
    # optimizer's reduce-scatter and deferred all-gather on both stages.
    argv = (TINY_LLAMA + LOSS_FLAGS["mile"] + OVERLAP + ["--pipeline-model-parallel-size", "2", "--no-align-grad-reduce",
                                                         "--use-distributed-optimizer", "--overlap-param-gather"])
    for rank in dist_pool(4).run(train_three_steps, argv, 4):
        assert rank["early_launches"] > 0
        for ours, ref in zip(rank["history"], single_process_runs["mile"]["history"]):
            assert ours[:3] == pytest.approx(ref[:3], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--overlap-param-gather", "--overlap-grad-reduce"], "--overlap-param-gather needs --use-distributed-optimizer"),
        (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-param-gather needs --overlap-grad-reduce"),
        (["--ddp-bucket-size", "1000"], "--ddp-bucket-size sizes the buckets that --overlap-grad-reduce reduces"),
        (["--overlap-grad-reduce", "--ddp-average-in-collective"], "--ddp-average-in-collective cannot be used"),
        (["--overlap-grad-reduce", "--ddp-bucket-size", "0"], "--ddp-bucket-size must be >= 1"),
    ],
)
def test_overlap_flags_are_checked_at_start_up(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY_LLAMA + extra, world_size=2)


def wrap_with_averaging_collective():
    """Worker body: megatron DDP with average_in_collective in per-token-loss mode; its error message."""
    import torch
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, calculate_per_token_loss=True,
                               activation_func=F.gelu, use_cpu_initialization=True)
    module = MegatronModule(config)
    module.weight = torch.nn.Parameter(torch.zeros(4))
    try:
        DistributedDataParallel(config, DistributedDataParallelConfig(average_in_collective=True), module)
    except AssertionError as error:
        return str(error)
    return None


def test_megatron_core_itself_refuses_averaging_with_per_token_loss(dist_pool):
    """Why --ddp-average-in-collective is refused at start-up: megatron-core's DDP does not allow it in the
    per-token-loss mode that the exact normalisation needs (it would fail later, at model wrapping)."""
    message = dist_pool(1).run(wrap_with_averaging_collective)[0]
    assert message is not None and "Cannot average in collective when calculating per-token loss" in message


def weights_after_two_steps(argv, world_size, gather):
    """Worker body: 2 training steps, then (if `gather`) finish_parameter_gather; every weight this rank holds."""
    from megatron_mile.training.optimizer import finish_parameter_gather
    from megatron_mile.training.setup import setup_training
    from megatron_mile.training.step import train_step

    setup = setup_training(parse_args(argv, world_size=world_size))
    for _ in range(2):
        train_step(setup)
    if gather:
        finish_parameter_gather(setup.model)
    return {name: param.detach().clone() for chunk in setup.model for name, param in chunk.named_parameters()}


def test_deferred_parameter_gather_is_finished_before_the_weights_are_used(dist_pool):
    """--overlap-param-gather leaves other ranks' shards of the updated weights to the next forward; before
    a checkpoint is written (and at the end of training) finish_parameter_gather brings them up to date."""
    import torch

    base = TINY_LLAMA + LOSS_FLAGS["mile"] + ["--use-distributed-optimizer"]
    overlapped = base + OVERLAP + ["--overlap-param-gather"]
    reference = dist_pool(2).run(weights_after_two_steps, base, 2, False)
    gathered = dist_pool(2).run(weights_after_two_steps, overlapped, 2, True)
    stale = dist_pool(2).run(weights_after_two_steps, overlapped, 2, False)
    for ours, theirs, old in zip(gathered, reference, stale):
        for name, weight in theirs.items():
            torch.testing.assert_close(ours[name], weight, rtol=1e-5, atol=1e-6, msg=name)
        # Without the gather some weights still hold the previous step's values: the check above can fail.
        assert any(not torch.allclose(old[name], weight, rtol=1e-5, atol=1e-6) for name, weight in theirs.items())
