"""The megatron-core release seams (megatron_mile.megatron_core_api) and the CPU layer's refusal of a patch
whose target is missing, on whichever supported release is installed.

The feature switches are checked against megatron-core's own API (signatures, module contents), not against
a list of versions, so a wrong switch fails here on the release where it is wrong.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from packaging.version import Version

from megatron_mile import megatron_core_api


def test_installed_release_is_the_one_megatron_core_reports():
    from megatron.core import package_info

    assert megatron_core_api.MEGATRON_CORE_VERSION == Version(package_info.__version__)


@pytest.mark.parametrize("version", ["0.16.1", "0.19.2", "0.19.5"])
def test_supported_releases_are_accepted(version):
    assert megatron_core_api._check(Version(version)) == Version(version)


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.17.1", "0.18.2", "0.19.0", "0.20.0"])
def test_unsupported_releases_are_refused_with_the_supported_ranges(version):
    with pytest.raises(megatron_core_api.UnsupportedMegatronCore, match=rf"{version} is installed.*>=0\.16\.1"):
        megatron_core_api._check(Version(version))


def test_output_processor_switch_matches_gpt_model_forward():
    from megatron.core.models.gpt import GPTModel

    has_hook = "output_processor" in inspect.signature(GPTModel.forward).parameters
    assert megatron_core_api.HAS_OUTPUT_PROCESSOR == has_hook


def test_common_load_strategy_switch_matches_dist_checkpointing():
    common = importlib.import_module("megatron.core.dist_checkpointing.strategies.common")
    load = inspect.signature(importlib.import_module("megatron.core.dist_checkpointing").load)
    assert megatron_core_api.HAS_COMMON_LOAD_STRATEGY == hasattr(common, "TorchCommonLoadStrategy")
    assert megatron_core_api.HAS_COMMON_LOAD_STRATEGY == ("common_strategy" in load.parameters)


def test_save_strategy_base_is_what_dist_checkpointing_save_accepts():
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megatron_mile.checkpointing.torch_dist import _InProcessTorchDistSaveStrategy

    strategy = _InProcessTorchDistSaveStrategy()
    assert isinstance(strategy, TorchDistSaveShardedStrategy)
    assert (strategy.backend, strategy.version) == ("torch_dist", 1)


def test_cpu_layer_refuses_a_missing_target_and_patches_nothing(monkeypatch):
    from megatron_mile import cpu_compat

    was_enabled = cpu_compat.is_enabled()
    cpu_compat.disable()
    original_current_device = torch.cuda.current_device
    real_patches = cpu_compat._patches
    bogus = cpu_compat.Patch("megatron.core.tensor_parallel.random", "no_such_rng_accessor", None, "test")
    monkeypatch.setattr(cpu_compat, "_patches", lambda cpu_torch: real_patches(cpu_torch) + [bogus])
    try:
        with pytest.raises(cpu_compat.PatchTargetMissing,
                           match=r"megatron\.core\.tensor_parallel\.random\.no_such_rng_accessor.*megatron-core "
                                 + str(megatron_core_api.MEGATRON_CORE_VERSION).replace(".", r"\.")):
            cpu_compat.enable()
        assert not cpu_compat.is_enabled()
        assert torch.cuda.current_device is original_current_device
    finally:
        monkeypatch.undo()
        if was_enabled:
            cpu_compat.enable()


def test_every_cpu_patch_target_exists_on_the_installed_release():
    """The whole table applies (and is undone) on this release: no target was renamed or removed."""
    from megatron_mile import cpu_compat

    was_enabled = cpu_compat.is_enabled()
    cpu_compat.enable()
    try:
        assert cpu_compat.is_enabled()
    finally:
        if not was_enabled:
            cpu_compat.disable()
