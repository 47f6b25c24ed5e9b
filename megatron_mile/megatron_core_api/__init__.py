"""The megatron-core releases this project runs on, and the seams where they differ.

Supported: megatron-core 0.16.1 (Python 3.10/3.11, the newest release that installs there) and 0.19.x from
0.19.2 (Python >= 3.12; 0.19.2 is the release checked). What differs between them is imported from here, not
from the megatron-core module that holds it in one release, so a release change is adapted in this package
alone. Each seam uses megatron-core's public API where the installed release has it, and a narrow adapter
where it does not:

- `checkpoint.load_torch_dist` (reading the common state, ``common.pt`` or 0.17+'s ``common_state`` object, the
  project's safe way)
    0.16.1: public ``dist_checkpointing.load`` with a ``common_strategy`` (a ``TorchCommonLoadStrategy``
    subclass around the caller's reader).
    0.19.x: ``TorchCommonLoadStrategy`` was removed (0.17) and ``load`` reads the common state itself
    (``common.pt``, or the ``common_state`` object through torch's default planner, which unpickles byte
    records with weights_only=False): its steps are composed from megatron-core's public checkpoint helpers around the
    caller's reader.
- `checkpoint.TorchDistSaveStrategy` / `TorchDistLoadStrategy` (bases of the in-process writer and the safe
  reader)
    both: megatron-core's public ``TorchDistSaveShardedStrategy`` / ``TorchDistLoadShardedStrategy``; 0.19
    deleted their 0.16.1 base module ``strategies.base``, and its ``dist_checkpointing.save`` accepts no other
    strategy type.
- `parallel.batch_on_this_context_parallel_rank` (this CP rank's chunks of every sequence)
    0.16.1: ``get_batch_on_this_cp_rank(batch)``.
    0.19.x: the same function with a required ``is_hybrid_cp`` (False here).
- `optimizer.load_optimizer_state` (a checkpoint's optimizer state into this run's optimizer)
    0.16.1: megatron's ``load_state_dict`` pairs saved parameter groups by structural keys only.
    0.19.x: also by the groups' learning-rate and weight-decay bounds, so a resume that changes ``--lr`` /
    ``--min-lr`` found no group: the saved groups take their positional partners' bounds before the load and
    get theirs back after it.
- `microbatches.init_calculator` / `ramp_calculator` (each step's global batch with --rampup-batch-size)
    0.16.1: ``RampupBatchsizeNumMicroBatchesCalculator`` (``init_num_microbatches_calculator(rampup_batch_size)``).
    0.19.x: no ramp calculator (``rampup_batch_size`` is ignored with a warning): the ramp is rewritten as the
    step schedule of ``StepBatchsizeNumMicroBatchesCalculator``, the same batch for every consumed count.
- `model.GPTModelWithLossHook` (the loss mask and the fused LM head where megatron computes the LM loss)
    0.16.1: overrides GPTModel's private ``_postprocess`` (there is no public way in).
    0.19.x: the public ``output_processor`` hook of ``GPTModel.forward`` (0.18+).

Not adapted (the same public names in both releases, checked): ``parallel_state``, ``tensor_parallel``,
``get_forward_backward_func``, ``OptimizerParamScheduler``, ``get_megatron_optimizer``, megatron DDP,
``megatron.core.datasets``. The CPU layer's patch table
(megatron_mile.cpu_compat) states per release what each patch covers.

Importing this package reads megatron-core's distribution metadata only; the submodules import what they
adapt.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

# The releases whose seams this package was written and tested against: (first, first not supported).
SUPPORTED_RANGES = ((Version("0.16.1"), Version("0.16.2")), (Version("0.19.2"), Version("0.20.0")))


class UnsupportedMegatronCore(ImportError):
    """The installed megatron-core is outside SUPPORTED_RANGES."""


def installed_version() -> Version:
    """The installed megatron-core release, from its distribution metadata (megatron.core is not imported:
    its package import costs seconds). A source checkout on sys.path without metadata (as NVIDIA's
    containers may mount Megatron-LM) falls back to megatron.core.package_info."""
    try:
        return Version(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError:
        from megatron.core import package_info  # noqa: PLC0415 - only without distribution metadata

        # Not __version__: it appends the short hash of whatever git checkout holds megatron-core's files
        # (a venv inside this project's clone gets this project's hash).
        return Version(package_info.__shortversion__ + package_info.PRE_RELEASE)


def _check(version: Version) -> Version:
    if not any(low <= version < high for low, high in SUPPORTED_RANGES):
        ranges = ", ".join(f">={low},<{high}" for low, high in SUPPORTED_RANGES)
        raise UnsupportedMegatronCore(
            f"megatron-core {version} is installed; megatron_mile supports {ranges} (setup.py pins them per "
            "Python version)"
        )
    return version


MEGATRON_CORE_VERSION: Version = _check(installed_version())

# Release features the seams switch on, named by what they provide (never compared elsewhere).
HAS_COMMON_LOAD_STRATEGY = MEGATRON_CORE_VERSION < Version("0.17")
HAS_OUTPUT_PROCESSOR = MEGATRON_CORE_VERSION >= Version("0.18")

__all__ = [
    "HAS_COMMON_LOAD_STRATEGY",
    "HAS_OUTPUT_PROCESSOR",
    "MEGATRON_CORE_VERSION",
    "SUPPORTED_RANGES",
    "UnsupportedMegatronCore",
    "installed_version",
]
