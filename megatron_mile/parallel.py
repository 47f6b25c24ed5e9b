"""Process groups and megatron's parallel state: created, laid out and torn down here, and only here.

Order of set-up in a process, as Megatron-LM does it:

1. `initialize_process_group` (torchrun's environment, any number of processes) or
   `initialize_single_process_group` (one process, no port): the default torch.distributed group, with
   the backend `megatron_mile.device` decides (NCCL on a GPU, gloo with the CPU compatibility layer on CPU);
2. `initialize_model_parallel`: megatron-core's tensor / pipeline / data-parallel groups for a layout, with
   the virtual-pipeline size from `virtual_pipeline_size`;
3. at the end, `shutdown`: the parallel state, then the default group.

`single_process_parallel_state` does 1 and 2 at TP=1/PP=1 for tools that run megatron code in one process
(export) and tears down only what it created.

megatron-core is imported inside the functions that use it: the test pool's parent process and the
light tools import this module for `find_free_port` and the process group, and megatron-core costs about
2 s to import.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_mile import device

# torch.distributed's own default for gloo/NCCL collectives is 10-30 minutes; ours is explicit.
DEFAULT_TIMEOUT_MINUTES = 10.0


def find_free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_process_group(backend: Optional[str] = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Create the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR ...).

    Idempotent. `backend` defaults to the device's (device.default_backend); on CPU the compatibility layer
    is enabled first (device.prepare_backend), so that megatron-core code run after this call finds the
    CUDA entry points it expects. Without RANK/WORLD_SIZE it runs as a single process on a free port.
    Raises RuntimeError for NCCL without a GPU. Collectives: init_process_group's rendezvous.
    """
    backend = device.prepare_backend(backend)
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(find_free_port())
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def initialize_single_process_group() -> None:
    """A gloo process group of this process alone, for tools that run megatron code in one process (export).

    Why not initialize_process_group: its TCP store needs a free port, and a MASTER_PORT left in the
    environment by a training launch (possibly still running) would be taken. An in-memory store needs
    no port. gloo even on a GPU machine: such tools work on the CPU. Idempotent.
    """
    device.prepare_backend("gloo")
    if dist.is_initialized():
        return
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)


def virtual_pipeline_size(
    num_layers: int, pipeline_model_parallel_size: int, num_layers_per_virtual_pipeline_stage: Optional[int]
) -> Optional[int]:
    """Model chunks per pipeline rank of the interleaved schedule (Megatron-LM's
    virtual_pipeline_model_parallel_size), None without a virtual pipeline.

    num_layers / (PP * layers per virtual stage); RunConfig.validate checks that it divides evenly.
    """
    if num_layers_per_virtual_pipeline_stage is None:
        return None
    return num_layers // (pipeline_model_parallel_size * num_layers_per_virtual_pipeline_stage)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    distributed_timeout_minutes: Optional[float] = None,
    context_parallel_size: int = 1,
) -> None:
    """megatron-core's TP/PP/CP/DP groups for this layout (data parallel = world / (TP * PP * CP)), replacing
    any layout set up before. Needs the process group (initialize_process_group).

    `distributed_timeout_minutes` bounds the new groups' collectives (megatron's default when None).
    Collectives: group creation on all ranks.
    """
    from megatron.core import parallel_state

    destroy_model_parallel()
    kwargs = {}
    if distributed_timeout_minutes is not None:
        kwargs["distributed_timeout_minutes"] = distributed_timeout_minutes
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        **kwargs,
    )


def model_parallel_is_initialized() -> bool:
    """True while megatron's parallel state is set up in this process."""
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def megatron_group_or_none(which: str):
    """megatron's "tensor" (tensor-parallel) or "data" (data-parallel x context-parallel) group, or None when
    torch.distributed or megatron's parallel state is not set up in this process (a single process)."""
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if which == "tensor":
        return parallel_state.get_tensor_model_parallel_group()
    if which == "data":
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    raise ValueError(f"which must be 'tensor' or 'data', got {which!r}")


def destroy_model_parallel() -> None:
    """Forget megatron's parallel state, if any (its groups stay alive until the process group goes)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def shutdown() -> None:
    """Destroy megatron's parallel state, then the default process group; a no-op for what is not set up."""
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process_parallel_state() -> Iterator[None]:
    """A process group and megatron's parallel state at TP=1/PP=1 for the duration of the block.

    Reuses what the caller already set up (e.g. a test worker at TP=1/PP=1) and tears down only what it
    created. Raises RuntimeError when this process already runs another layout. Collectives: group creation
    (one process: nothing to wait for).
    """
    from megatron.core import parallel_state

    created_group = not dist.is_initialized()
    if created_group:
        initialize_single_process_group()
    created_state = not model_parallel_is_initialized()
    try:
        if created_state:
            initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        else:
            layout = (parallel_state.get_tensor_model_parallel_world_size(),
                      parallel_state.get_pipeline_model_parallel_world_size())
            if layout != (1, 1):
                raise RuntimeError(f"this needs megatron's parallel state at TP=1/PP=1 (or none set up), but this "
                                   f"process runs TP={layout[0]}/PP={layout[1]}")
        yield
    finally:
        if created_state:
            destroy_model_parallel()
        if created_group and dist.is_initialized():
            dist.destroy_process_group()
