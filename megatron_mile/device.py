"""Device and process-group setup: the one place that decides between CUDA+NCCL and CPU+gloo.

On a GPU machine this module only sets the CUDA device and creates an NCCL process group; nothing of the
CPU compatibility layer is imported or run there. Without a GPU it enables `megatron_mile.cpu_compat`
(which neutralises megatron-core's CUDA assumptions) before any model is built, and uses gloo.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist


def gpu_available() -> bool:
    """True when CUDA can be used by this process."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def default_backend() -> str:
    """NCCL where a GPU exists, gloo otherwise."""
    return "nccl" if gpu_available() else "gloo"


def compute_device() -> torch.device:
    """The device models and batches live on in this process."""
    if gpu_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_distributed(backend: Optional[str] = None, timeout_minutes: float = 10.0) -> None:
    """Create the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR ...).

    Idempotent. On CPU it first enables the CPU compatibility layer, so that megatron-core code run after
    this call finds the CUDA entry points it expects. Without RANK/WORLD_SIZE it runs as a single process.
    """
    backend = backend or default_backend()
    if backend == "nccl" and not gpu_available():
        raise RuntimeError("backend 'nccl' needs a CUDA GPU and none is visible; use 'gloo' on CPU")
    if backend == "gloo" and not gpu_available():
        from megatron_mile import cpu_compat

        cpu_compat.enable()
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from megatron_mile.testing.distributed import find_free_port

        os.environ["MASTER_PORT"] = str(find_free_port())
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def initialize_single_process() -> None:
    """A gloo process group of this process alone, for tools that run megatron code in one process (export).

    Why not initialize_distributed: its TCP store needs a free port, and a MASTER_PORT left in the
    environment by a training launch (possibly still running) would be taken. An in-memory store needs
    no port. gloo even on a GPU machine: such tools work on the CPU. Idempotent.
    """
    if not gpu_available():
        from megatron_mile import cpu_compat

        cpu_compat.enable()
    if dist.is_initialized():
        return
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
