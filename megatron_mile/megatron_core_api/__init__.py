"""The megatron-core releases this project runs on, and the seams where they differ.

Supported: megatron-core 0.16.1 (Python 3.10/3.11, the newest release that installs there) and 0.19.x
(Python >= 3.12). Every other module of the project imports the names below from here instead of from
the megatron-core module that holds them in one release, so a release change is adapted in this package
alone. Each seam uses megatron-core's public API where the installed release has it, and a narrow adapter
where it does not:

=====================  ==========================================  ==========================================
seam                   0.16.1                                      0.19.x
=====================  ==========================================  ==========================================
checkpoint.load_       ``dist_checkpointing.load`` with a           ``dist_checkpointing.load`` has no common
torch_dist             ``common_strategy`` (a                       strategy (``TorchCommonLoadStrategy`` was
                       ``TorchCommonLoadStrategy`` subclass) that   removed in 0.17) and reads ``common.pt``
                       reads ``common.pt`` the caller's way         itself: its load steps are composed here
                                                                    from megatron-core's public helpers
                                                                    around the caller's ``common.pt`` reader
checkpoint.TorchDist   ``TorchDistSaveShardedStrategy`` (public     the same class (its ``strategies.base``
SaveStrategy           in both; derives from ``strategies.base``)   base module was deleted in 0.19);
                                                                    ``dist_checkpointing.save`` accepts no
                                                                    other strategy type
model.GPTModelWith     overrides GPTModel's private                 the public ``output_processor`` hook of
OutputHook             ``_postprocess`` (the only way in)           ``GPTModel.forward`` (0.18+)
=====================  ==========================================  ==========================================

Not adapted (the same public names in both releases, checked): ``parallel_state``, ``tensor_parallel``,
``get_forward_backward_func``, ``OptimizerParamScheduler``, ``get_megatron_optimizer``, megatron DDP,
``megatron.core.datasets``. The CPU layer's patch table (megatron_mile.cpu_compat) states per release what
each patch covers.

Importing this package reads megatron-core's distribution metadata only; the submodules import what they
adapt.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

# The releases whose seams this package was written and tested against: (first, first not supported).
SUPPORTED_RANGES = ((Version("0.16.1"), Version("0.16.2")), (Version("0.19.0"), Version("0.20.0")))


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

        return Version(package_info.__version__)


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
