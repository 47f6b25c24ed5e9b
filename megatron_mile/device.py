"""The device decision: the one place that chooses between CUDA+NCCL and CPU+gloo.

On a GPU machine nothing of the CPU compatibility layer is imported or run. Without a GPU,
`prepare_backend` enables `megatron_mile.cpu_compat` (which neutralises megatron-core's CUDA assumptions)
before any model is built. Process groups themselves are created in `megatron_mile.parallel`.
"""

from __future__ import annotations

from typing import Optional

import torch


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


def prepare_backend(backend: Optional[str] = None) -> str:
    """The process-group backend to use (`backend`, or this machine's default), with the device made ready
    for megatron-core: on a machine without a GPU the CPU compatibility layer is enabled (idempotent).

    Raises RuntimeError for 'nccl' where no GPU is visible.
    """
    backend = backend or default_backend()
    if backend == "nccl" and not gpu_available():
        raise RuntimeError("backend 'nccl' needs a CUDA GPU and none is visible; use 'gloo' on CPU")
    if not gpu_available():
        # Imported here, not at the top: on a GPU machine the layer is never imported at all.
        from megatron_mile import cpu_compat

        cpu_compat.enable()
    return backend
