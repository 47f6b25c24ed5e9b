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

    # (package_info.__version__ may carry "+<git hash>" of a checkout around the venv: the release fields.)
    version = megatron_core_api.MEGATRON_CORE_VERSION
    assert version.release == (package_info.MAJOR, package_info.MINOR, package_info.PATCH)
    assert version.pre == (Version(package_info.__shortversion__ + package_info.PRE_RELEASE).pre)


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


def _seam_worker(fused: bool):
    """Worker body: one tiny model forward with labels and a loss mask, and one without labels. Returns what
    compute_language_model_loss saw, whether the fused head ran, and the output shapes."""
    from tiny_model import TINY_LLAMA, build_tiny_model, tiny_config

    argv = TINY_LLAMA + ["--loss-type", "cross_entropy"] + (["--fused-lm-head"] if fused else [])
    config = tiny_config(argv)
    (chunk,) = build_tiny_model(config, 300)
    seen = {"masks": [], "fused_calls": 0}
    original_loss = chunk.compute_language_model_loss

    def capture(labels, logits):
        seen["masks"].append(None if chunk.loss_mask_in_flight is None else chunk.loss_mask_in_flight.clone())
        return original_loss(labels, logits)

    chunk.compute_language_model_loss = capture
    gpt_module = importlib.import_module("megatron_mile.model.gpt")
    original_fused = gpt_module.fused_language_model_loss

    def count_fused(*args, **kwargs):
        seen["fused_calls"] += 1
        return original_fused(*args, **kwargs)

    gpt_module.fused_language_model_loss = count_fused
    try:
        gen = torch.Generator().manual_seed(5)
        seq = config.model.seq_length
        tokens = torch.randint(0, 300, (2, seq), generator=gen)
        labels = torch.randint(0, 300, (2, seq), generator=gen)
        loss_mask = (torch.rand(2, seq, generator=gen) > 0.3).float()
        positions = torch.arange(seq).expand(2, -1)
        packed = chunk(tokens, positions, None, labels=labels, loss_mask=loss_mask)
        logits = chunk(tokens, positions, None)
    finally:
        gpt_module.fused_language_model_loss = original_fused
    return dict(masks=seen["masks"], fused_calls=seen["fused_calls"], loss_mask=loss_mask,
                packed_shape=tuple(packed.shape), logits_shape=tuple(logits.shape),
                mask_after=chunk.loss_mask_in_flight)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_lm_head"])
def test_loss_hook_sees_the_micro_batch_loss_mask(dist_pool, fused):
    report = dist_pool(1).run(_seam_worker, fused)[0]
    if fused:
        assert report["fused_calls"] == 1 and report["masks"] == []
    else:
        assert report["fused_calls"] == 0 and len(report["masks"]) == 1
        assert torch.equal(report["masks"][0], report["loss_mask"])
    seq = report["loss_mask"].shape[1]
    assert report["packed_shape"] == (2, seq, 5)  # [b, s, (loss, ce, weight, entropy, z-loss)]
    assert report["logits_shape"][:2] == (2, seq)  # without labels: megatron's logits [b, s, V]
    assert report["mask_after"] is None
