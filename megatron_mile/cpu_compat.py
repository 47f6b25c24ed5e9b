"""CPU compatibility layer: lets megatron-core's training stack run on a machine without a GPU (gloo).

megatron-core (0.16.1 and 0.19.x alike) assumes CUDA in many places (model build, buffers, RNG, pipeline schedules, optimizer).
`enable()` neutralises those assumptions for the whole process, before any model is built;
`megatron_mile.device.prepare_backend` calls it only when no GPU is visible, and `enable()` refuses to run
where CUDA is available, so nothing here ever touches the GPU path.

Design: every problem gets the narrowest mechanism that solves it, so that code outside megatron-core and
the hot path of a training step pay (almost) nothing:

* `torch.cuda.*` entry points that cannot work in a CPU build of torch (they raise "Torch not compiled with
  CUDA enabled") are replaced by CPU equivalents. Nothing outside megatron calls them on a CPU machine, since
  they could only fail there; `torch.cuda.is_available()` keeps answering False, so torch's own code and
  megatron's `is_available()` guards still take their CPU branches.
* `device="cuda"` literals: the few megatron modules that hold one get their own `torch` global, a copy of
  the torch namespace whose tensor factories map a CUDA device to the CPU. Every other name in those modules,
  and every other module, resolves to the real torch: no global function mode, no per-op interception.
* `Tensor.cuda()` is the identity on CPU tensors; `Tensor.type()` answers CUDA-style names ('torch.cuda.
  FloatTensor') to callers inside megatron.core only, which is what the optimizer's dtype checks compare to.
* The model-parallel RNG tracker keeps megatron's logic; only its two private state accessors are pointed at
  the CPU default generator, which is the one CPU dropout draws from. Per-name tracker states therefore really
  fork and restore, and the tensor-parallel state differs across TP ranks as megatron seeds it.

Every patch is a `Patch` in `PATCHES` (owner, attribute, replacement, why + megatron call site); `disable()`
restores the originals, which the tests and the benchmark use. The table was checked, call site by call
site, against the megatron-core releases in `CHECKED_MEGATRON_CORE_VERSIONS`; docs/megatron-core-versions.md
states what each patch covers in each of them. Every target must already exist: `enable()` refuses,
before patching anything, a table entry whose attribute its owner lacks (`PatchTargetMissing`, naming
module.attribute and the installed megatron-core), since a renamed megatron function would otherwise get a
replacement set beside it that nothing calls, and the CUDA path it was meant to neutralise would fail later,
far from the cause.

Semantics that differ from a GPU, by construction:
* one generator serves as both the CPU RNG and megatron's "CUDA" default stream, so CPU random draws made
  between steps (e.g. data shuffling with torch's global RNG) also shift the default-stream dropout masks.
  Named tracker states (tensor-model-parallel, data-parallel, expert) are separate, as on a GPU;
* streams and events are synchronous stand-ins; timings from them are wall-clock.

Not covered (fail or are unsupported on CPU whatever this layer does): transformer-engine / FP8, apex fused
kernels (gradient_accumulation_fusion), apply_rope_fusion, CUDA graphs and graph-safe RNG, NCCL user
buffers, megatron-FSDP (its own CUDA RNG helpers), the inference engines (`f"cuda:{current_device()}"`),
sequence_parallel with the local spec (torch norms refuse it).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

# megatron-core releases whose call sites the patch table below was checked against (module docstring).
CHECKED_MEGATRON_CORE_VERSIONS = ("0.16.1", "0.19.2")

_CPU = torch.device("cpu")
_lock = threading.Lock()
_enabled = False
# (owner, attribute name, original value or _MISSING) in the order applied; undone in reverse by disable().
_applied: List[tuple] = []
_MISSING = object()


# ----------------------------------------------------------------------------------------------------------
# torch.cuda stand-ins
# ----------------------------------------------------------------------------------------------------------


def _current_device() -> torch.device:
    # Callers pass the result as `device=` (torch.empty(..., device=torch.cuda.current_device())), so the CPU
    # device works everywhere megatron only allocates with it. An int would mean cuda:<int> to torch.
    return _CPU


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _empty_stats(*args: Any, **kwargs: Any) -> dict:
    return {}


def _manual_seed(seed: int) -> None:
    # On CPU the "CUDA" default RNG stream is the CPU default generator (CPU dropout draws from it).
    torch.default_generator.manual_seed(int(seed))


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.default_generator.set_state(new_state)


class _CpuEvent:
    """torch.cuda.Event on CPU: work is synchronous, so an event is just a wall-clock timestamp."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: Optional[float] = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: "_CpuEvent") -> float:
        if self._t is None or end_event._t is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end_event._t - self._t) * 1000.0  # ms, like CUDA events


class _CpuStream:
    """torch.cuda.Stream on CPU: a single in-order executor, so every wait is already satisfied."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        self.device = _CPU

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Optional[_CpuEvent] = None) -> _CpuEvent:
        event = event or _CpuEvent()
        event.record()
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _CpuStream()


def _default_stream(device: Any = None) -> _CpuStream:
    return _DEFAULT_STREAM


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Tensor methods
# ----------------------------------------------------------------------------------------------------------

_orig_tensor_type = torch.Tensor.type


def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any):
    # Tensor.cuda() moves to "the" accelerator; on CPU the tensor is already where megatron expects it.
    # Identity (not a copy) matches CUDA semantics for a tensor already on the target device.
    return self


def _tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
    if dtype is None and not kwargs:
        name = _orig_tensor_type(self)
        # Only megatron.core's own checks are answered in CUDA spelling; anyone else sees the truth.
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron.core") and name.startswith("torch.") and self.device.type == "cpu":
            return "torch.cuda." + name[6:]
        return name
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        dtype = "torch." + dtype[11:]
    return _orig_tensor_type(self, dtype, non_blocking, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# A torch namespace for the megatron modules that hold device="cuda" literals
# ----------------------------------------------------------------------------------------------------------


def _is_cuda(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # an int device means cuda:<int>


def _cpu_factory(fn: Callable) -> Callable:
    def factory(*args: Any, **kwargs: Any):
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    factory.__name__ = factory.__qualname__ = fn.__name__
    factory.__doc__ = f"torch.{fn.__name__} with a CUDA device= mapped to the CPU (megatron_mile.cpu_compat)."
    factory.__wrapped__ = fn
    return factory


def _cpu_autocast(device_type: str, *args: Any, **kwargs: Any):
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


# Factories megatron calls with a device="cuda" literal in the modules of _CUDA_LITERAL_MODULES.
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")


def _make_cpu_torch_namespace() -> types.ModuleType:
    """A module object that is torch, except for CUDA-mapping factories and autocast.

    A copy of torch's namespace (not a proxy) so that every other attribute lookup costs exactly what it
    costs on torch itself; `__getattr__` forwards names torch creates lazily after the copy was taken.
    """
    namespace = types.ModuleType("torch", doc="torch with device='cuda' factories mapped to the CPU")
    namespace.__dict__.update(torch.__dict__)
    namespace.__dict__["__getattr__"] = lambda name: getattr(torch, name)
    for name in _FACTORIES:
        setattr(namespace, name, _cpu_factory(getattr(torch, name)))
    namespace.autocast = _cpu_autocast
    return namespace


# megatron modules whose code creates tensors with a device="cuda" literal on the training path; each gets the
# namespace above as its `torch`. Module -> the call sites that need it.
_CUDA_LITERAL_MODULES = {
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens = torch.zeros(..., device='cuda') in every "
    "forward_backward_* function; torch.autocast('cuda') when config.enable_autocast",
    "megatron.core.optimizer.clip_grads": "get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32 "
    "(dummy_overflow_buf, total_norm_cuda, total_num_zeros)",
    "megatron.core.utils": "local_multi_tensor_l2_norm (clip_grads' norm without apex/TE): l2_cuda",
    "megatron.core.optimizer.optimizer": "MixedPrecisionOptimizer.__init__ (found_inf, _dummy_overflow_buf, "
    "_scale_one), FP32Optimizer._scale",
    "megatron.core.optimizer.grad_scaler": "ConstantGradScaler / DynamicGradScaler tensors (fp16 loss scale)",
    "megatron.core.transformer.utils": "get_default_causal_mask / get_sliding_window_causal_mask",
    "megatron.core.tensor_parallel.data": "broadcast_data: sizes_cuda",
}


# ----------------------------------------------------------------------------------------------------------
# The patch table
# ----------------------------------------------------------------------------------------------------------


class PatchTargetMissing(RuntimeError):
    """A patch targets an attribute its owner does not have (megatron-core or torch renamed or removed it)."""


@dataclass(frozen=True)
class Patch:
    """One attribute replaced by enable(): `owner.name = replacement` (owner given as a dotted path)."""

    owner: str
    name: str
    replacement: Any
    why: str


def _patches(cpu_torch: types.ModuleType) -> List[Patch]:
    random_mod = "megatron.core.tensor_parallel.random"
    table = [
        # --- model build and buffers ---
        Patch("torch.cuda", "current_device", _current_device,
              "~175 megatron call sites allocate with device=torch.cuda.current_device(): VocabParallelEmbedding"
              " / Column- and RowParallelLinear weights, GlobalMemoryBuffer.get_tensor, p2p shape tensors, "
              "DDP grad buffers, distributed optimizer shards, Timers"),
        Patch("torch.cuda", "synchronize", _noop,
              "p2p_communication._communicate after batch_isend_irecv, Timers, DDP; CPU work is synchronous"),
        Patch("torch.cuda", "empty_cache", _noop, "optimizer / DDP buffer offloading; no CUDA cache on CPU"),
        Patch("torch.cuda", "memory_allocated", _zero, "memory reports in training loops"),
        Patch("torch.cuda", "max_memory_allocated", _zero, "memory reports in training loops"),
        Patch("torch.cuda", "memory_reserved", _zero, "memory reports in training loops"),
        Patch("torch.cuda", "max_memory_reserved", _zero, "memory reports in training loops"),
        Patch("torch.cuda", "memory_stats", _empty_stats, "memory reports in training loops"),
        Patch("torch.cuda", "Event", _CpuEvent, "timing / straggler detection events (megatron.core.utils)"),
        Patch("torch.cuda", "Stream", _CpuStream,
              "DDP communication stream (num_distributed_optimizer_instances > 1)"),
        Patch("torch.cuda", "current_stream", _default_stream, "stream waits in DDP and the optimizer"),
        Patch("torch.cuda", "default_stream", _default_stream,
              "param_and_grad_buffer: default_stream().wait_stream(communication_stream)"),
        Patch("torch.cuda", "stream", _stream_context, "param_and_grad_buffer: with torch.cuda.stream(...)"),
        # --- RNG ---
        Patch("torch.cuda", "manual_seed", _manual_seed,
              "model_parallel_cuda_manual_seed seeds the default CUDA stream; CudaRNGStatesTracker.add seeds "
              "each named state"),
        Patch("torch.cuda", "manual_seed_all", _manual_seed, "same as manual_seed (one CPU generator)"),
        Patch("torch.cuda", "get_rng_state", _get_rng_state, "CudaRNGStatesTracker.add saves/restores state"),
        Patch("torch.cuda", "set_rng_state", _set_rng_state, "symmetry with get_rng_state"),
        Patch(random_mod, "_get_cuda_rng_state", _get_rng_state_megatron,
              "CudaRNGStatesTracker.fork, CheckpointFunction and _fork_rng read the CUDA generator state"),
        Patch(random_mod, "_set_cuda_rng_state", _set_rng_state_megatron,
              "CudaRNGStatesTracker.fork/add, CheckpointFunction restore the CUDA generator state "
              "(megatron's version goes through torch.cuda._lazy_call and CUDA default_generators)"),
        # --- tensor methods ---
        Patch("torch.Tensor", "cuda", _tensor_cuda,
              "LanguageModule.setup_embeddings_and_output_layer (tied embeddings, PP>1), "
              "tensor_parallel.broadcast_data, DistributedOptimizer checkpoint gather, grad_scaler.load_state_dict"),
        Patch("torch.Tensor", "type", _tensor_type,
              "clip_grads: assert param.grad.type() == 'torch.cuda.FloatTensor'; Float16OptimizerWithFloat16Params"
              " and DistributedOptimizer sort params by param.type() in ['torch.cuda.HalfTensor', ...]"),
        # --- pipeline p2p ---
        Patch("megatron.core.pipeline_parallel.p2p_communication", "_batched_p2p_ops", _tagged_batched_p2p_ops,
              "pipeline schedules' send/recv: with PP=2 the previous and next stage are the same rank, and gloo "
              "matches same-shape messages between a pair only by tag and order, so a forward activation could "
              "be received as a backward gradient (seen with the interleaved schedule); NCCL matches by issue "
              "order"),
    ]
    for module_name, sites in _CUDA_LITERAL_MODULES.items():
        table.append(Patch(module_name, "torch", cpu_torch, "device='cuda' literals: " + sites))
    return table


# Tags that tell the two directions apart: what a rank sends "next" its peer receives "from prev".
_TAG_FORWARD, _TAG_BACKWARD = 1, 2


def _tagged_batched_p2p_ops(
    *, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, group, prev_pipeline_rank,
    next_pipeline_rank,
):
    """megatron's _batched_p2p_ops with a tag per direction (same argument names, same return value)."""
    dist = torch.distributed
    ops = []
    for tensor, op, peer, tag in (
        (tensor_send_prev, dist.isend, prev_pipeline_rank, _TAG_BACKWARD),
        (tensor_recv_prev, dist.irecv, prev_pipeline_rank, _TAG_FORWARD),
        (tensor_send_next, dist.isend, next_pipeline_rank, _TAG_FORWARD),
        (tensor_recv_next, dist.irecv, next_pipeline_rank, _TAG_BACKWARD),
    ):
        if tensor is not None:
            ops.append(dist.P2POp(op, tensor, peer, group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def _get_rng_state_megatron(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    # get_state() returns a fresh tensor, so the saved state never aliases the live generator.
    return torch.default_generator.get_state()


def _set_rng_state_megatron(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.default_generator.set_state(new_state)


class _DropForkWarning(logging.Filter):
    """CudaRNGStatesTracker.fork warns when the CPU RNG state changed inside a fork. On CPU the tracked state
    *is* the CPU generator, so every dropout under the tracker triggers it; the warning is meaningless here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_FORK_WARNING_FILTER = _DropForkWarning()
_RANDOM_LOGGER = "megatron.core.tensor_parallel.random"

PATCHES: List[Patch] = []


def _resolve(owner: str) -> Any:
    if owner == "torch.Tensor":
        return torch.Tensor
    return importlib.import_module(owner)


def _megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def _refuse_missing_targets(patches: List[Patch], owners: List[Any]) -> None:
    """Raise PatchTargetMissing naming every `owner.name` that does not exist (inherited attributes count)."""
    missing = [f"{patch.owner}.{patch.name}" for patch, owner in zip(patches, owners) if not hasattr(owner, patch.name)]
    if missing:
        raise PatchTargetMissing(
            f"megatron_mile.cpu_compat cannot patch {', '.join(missing)}: not found with megatron-core "
            f"{_megatron_core_version()} and torch {torch.__version__} (the patch table was checked against "
            f"megatron-core {', '.join(CHECKED_MEGATRON_CORE_VERSIONS)}). The attribute was renamed or removed: "
            "find its new name at the call site given in the patch's `why`, or install a checked release"
        )


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def is_enabled() -> bool:
    """True while the layer is active in this process."""
    return _enabled


def enable() -> None:
    """Activate the layer for this process (idempotent). Call before any megatron model is built.

    Raises RuntimeError where CUDA is available: on a GPU the real CUDA paths must run untouched; and
    PatchTargetMissing (a RuntimeError) when a patched attribute does not exist, with nothing patched.
    """
    global _enabled
    with _lock:
        if _enabled:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "megatron_mile.cpu_compat is for machines without a GPU, but CUDA is available here; "
                "use megatron_mile.parallel.initialize_process_group(), which enables it only on CPU"
            )
        # Imports megatron.core (and with it every module patched below) if the caller has not yet.
        import megatron.core  # noqa: F401

        table = _patches(_make_cpu_torch_namespace())
        owners = [_resolve(patch.owner) for patch in table]
        _refuse_missing_targets(table, owners)
        PATCHES[:] = table
        try:
            for patch, owner in zip(PATCHES, owners):
                # For a class, remember only what it defines itself: an inherited method is restored by
                # deleting the override, not by pinning the inherited one onto the subclass.
                if isinstance(owner, type) and patch.name not in owner.__dict__:
                    original = _MISSING
                else:
                    original = getattr(owner, patch.name, _MISSING)
                _applied.append((owner, patch.name, original))
                setattr(owner, patch.name, patch.replacement)
        except BaseException:
            _undo()
            raise
        logging.getLogger(_RANDOM_LOGGER).addFilter(_FORK_WARNING_FILTER)
        _enabled = True


def disable() -> None:
    """Restore every patched attribute (used by tests and the benchmark). A no-op when not enabled."""
    global _enabled
    with _lock:
        if not _enabled:
            return
        _undo()
        logging.getLogger(_RANDOM_LOGGER).removeFilter(_FORK_WARNING_FILTER)
        _enabled = False


def _undo() -> None:
    while _applied:
        owner, name, original = _applied.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
