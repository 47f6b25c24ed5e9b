"""Process setup for a run: the process group and megatron's parallel state (through megatron_mile.parallel)
and random seeds, in that order, before any model is built."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_mile import parallel
from megatron_mile.config import RunConfig


def initialize_parallel(config: RunConfig) -> None:
    """Create the process group and megatron's TP/PP/CP/DP groups for `config` (idempotent for the group;
    a parallel state set up before is replaced), and with --tp-comm-overlap Transformer Engine's
    userbuffers.

    Collectives: those of torch.distributed.init_process_group and initialize_model_parallel (group
    creation on all ranks), and Transformer Engine's userbuffer bootstrap over the TP group.
    """
    p = config.parallel
    parallel.initialize_process_group(backend=p.distributed_backend,
                                      timeout_minutes=config.training.distributed_timeout_minutes)
    parallel.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(
            config.model.num_layers, p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
        ),
        context_parallel_size=p.context_parallel_size,
    )
    if p.tp_comm_overlap:
        initialize_tp_comm_overlap(config)


def initialize_tp_comm_overlap(config: RunConfig) -> None:
    """Transformer Engine's userbuffers for --tp-comm-overlap, sized as Megatron-LM sizes them: one
    [seq * micro-batch / CP, hidden] activation per TP group (GPUs with Transformer Engine only; start-up
    validation refuses the flag elsewhere). Collectives: TE's bootstrap of the buffers over the TP group.
    """
    import inspect

    from transformer_engine.pytorch.module import base as te_base  # GPU-only package, present when allowed

    m, p, t = config.model, config.parallel, config.training
    shape = [m.seq_length * t.micro_batch_size // p.context_parallel_size, m.hidden_size]
    fp8 = config.kernels.fp8_format is not None
    kwargs = dict(shape=shape, tp_size=p.tensor_model_parallel_size, ub_cfgs={}, bootstrap_backend="nccl")
    if "quantization_modes" in inspect.signature(te_base.initialize_ub).parameters:  # Transformer Engine 2.7+
        mode = te_base.UserBufferQuantizationMode
        kwargs["quantization_modes"] = [mode.FP8 if fp8 else mode.NONE]
    else:
        kwargs["use_fp8"] = fp8
    te_base.initialize_ub(**kwargs)


def set_random_seeds(seed: int) -> None:
    """Seed Python, numpy and torch; megatron's model-parallel RNG tracker gets per-TP-rank streams.

    As in Megatron-LM, pipeline stages get different streams (seed + 100 * PP rank) for dropout; the
    initial weights do not depend on it (megatron_mile.model.SeededTransformerLayer).
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def is_logging_rank() -> bool:
    """The last global rank: it sits on the last pipeline stage, where the loss is known."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def print_rank_last(message: str) -> None:
    if is_logging_rank():
        print(message, flush=True)
