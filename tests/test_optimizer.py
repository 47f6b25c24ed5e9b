"""The optimizer on CPU: torch's fused Adam kernel, switched on inside megatron's optimizer, must make the
same updates as torch's reference (single-tensor) Adam, and stay switched on after a checkpoint load.

Workers run in spawned gloo processes on the small model of tests/test_checkpointing.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mile import checkpointing
from megatron_mile.training.optimizer import torch_adams, use_fused_torch_adam_on_cpu
from test_checkpointing import build, full_params, make_config, run_step


def _torch_param_groups(optimizer):
    """The param groups of every torch Adam inside megatron's (chained) optimizer (there must be one)."""
    groups = [group for _, adam in torch_adams(optimizer) for group in adam.param_groups]
    assert groups, "megatron's optimizer should fall back to torch's Adam on CPU"
    return groups


def worker_fused_matches_reference(distributed_optimizer, bf16):
    """Three steps with the fused kernel and three with torch's single-tensor Adam, from the same start."""
    config = make_config(dropout=0.0, distributed_optimizer=distributed_optimizer, bf16=bf16, disable_bias_linear=True)
    fused_model, fused_optimizer, fused_scheduler = build(config)
    groups = _torch_param_groups(fused_optimizer)
    switched = [bool(g["fused"]) for g in groups]

    reference_model, reference_optimizer, reference_scheduler = build(config)
    for group in _torch_param_groups(reference_optimizer):
        group["fused"], group["foreach"] = False, False  # torch's for-loop Adam: the reference

    start = full_params(fused_model)
    for step in (1, 2, 3):
        fused_loss = run_step(fused_model, fused_optimizer, fused_scheduler, step)
        reference_loss = run_step(reference_model, reference_optimizer, reference_scheduler, step)
        if fused_loss is not None:
            torch.testing.assert_close(fused_loss, reference_loss, rtol=1e-5, atol=0)
    fused, reference = full_params(fused_model), full_params(reference_model)
    moved = [name for name in start if not torch.equal(start[name], reference[name])]
    # Tight for fp32: both kernels compute the same update and differ only in rounding. (Biases are off: the
    # key bias gets a gradient of pure rounding noise, softmax does not see it, and Adam scales that noise up
    # to a step of about lr, so no tolerance would tell a kernel error from it.)
    tolerance = dict(rtol=1e-2, atol=1e-2) if bf16 else dict(rtol=1e-5, atol=config.optimizer.lr * 1e-5)
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    return switched, len(moved), len(start)


@pytest.mark.parametrize(
    "world,distributed_optimizer,bf16",
    [(1, False, False), (1, False, True), (2, True, False)],
    ids=["fp32", "bf16_master_weights", "dp2_distributed_optimizer"],
)
def test_fused_adam_matches_torch_reference_adam(dist_pool, world, distributed_optimizer, bf16):
    for switched, moved, total in dist_pool(world).run(worker_fused_matches_reference, distributed_optimizer, bf16):
        assert switched and all(switched)  # every group (decayed and not) uses the fused kernel
        assert moved == total  # the comparison is not vacuous: every parameter was updated


def worker_fused_after_load(directory):
    """A checkpoint saved by the unfused optimizer (as older ones are) loads into a fused optimizer."""
    from megatron_mile.arguments import config_to_dict

    config = make_config(dropout=0.0)
    model, optimizer, scheduler = build(config)
    for group in _torch_param_groups(optimizer):
        group["fused"], group["foreach"] = False, False
    run_step(model, optimizer, scheduler, 1)
    checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 2, config_to_dict(config))

    model2, optimizer2, scheduler2 = build(make_config(dropout=0.0, seed=7))
    checkpointing.load_checkpoint(directory, model2, optimizer2, scheduler2, config_to_dict(config))
    return [bool(g["fused"]) for g in _torch_param_groups(optimizer2)]


def test_fused_adam_survives_checkpoint_load(dist_pool, tmp_path):
    (flags,) = dist_pool(1).run(worker_fused_after_load, str(tmp_path))
    assert flags and all(flags)


def test_groups_the_kernel_cannot_take_and_other_optimizers_are_left_alone():
    """Groups holding a tensor the CPU kernel cannot take, and optimizers other than torch's Adam, keep
    their flags."""

    class Wrapper:  # the shape of megatron's optimizer: the torch optimizer under .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    cpu_float = torch.nn.Parameter(torch.zeros(3))
    cpu_int = torch.zeros(3, dtype=torch.int64)  # stands in for a tensor the fused kernel rejects
    adam = torch.optim.AdamW([{"params": [cpu_float]}, {"params": [cpu_float.detach().clone().requires_grad_()]}])
    adam.param_groups[1]["params"].append(cpu_int)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)

    assert use_fused_torch_adam_on_cpu(Wrapper(adam)) == 1
    assert [g["fused"] for g in adam.param_groups] == [True, None]
    assert use_fused_torch_adam_on_cpu(Wrapper(sgd)) == 0
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]


@pytest.mark.parametrize("flags, reduce_in_fp32", [
    (["--bf16"], True),  # Megatron-LM's default under bf16: fp32 accumulation and reduction
    (["--bf16", "--accumulate-allreduce-grads-in-fp32"], True),
    (["--bf16", "--grad-reduce-in-bf16"], False),
    ([], True),
])
def test_gradient_reduction_dtype_reaches_megatrons_ddp_config(flags, reduce_in_fp32):
    from megatron_mile.arguments import parse_args
    from megatron_mile.training.optimizer import ddp_config
    from tiny_model import TINY_LLAMA

    assert ddp_config(parse_args(TINY_LLAMA + flags, world_size=1)).grad_reduce_in_fp32 is reduce_in_fp32


def test_gradient_reduction_dtype_flag_misuse_is_refused():
    from megatron_mile.arguments import parse_args
    from megatron_mile.config import ConfigError
    from tiny_model import TINY_LLAMA

    with pytest.raises(ConfigError, match="--grad-reduce-in-bf16 needs --bf16"):
        parse_args(TINY_LLAMA + ["--grad-reduce-in-bf16"], world_size=1)
    with pytest.raises(ConfigError, match="give one of --grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32"):
        parse_args(TINY_LLAMA + ["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"], world_size=1)
