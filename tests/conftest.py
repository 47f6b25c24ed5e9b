"""Shared fixtures: reusable multi-process pools (gloo) and the GPU marker."""

import pytest
import torch

from megatron_mile.testing.distributed import DistributedPool


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and Transformer Engine where named)")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; runs on GPU machines")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same torch and Python random state, so a failure reproduces on rerun."""
    import random

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dist_pool():
    """dist_pool(world_size) -> a DistributedPool kept alive for the whole test session.

    A pool that was killed after a hang is replaced, so one hung test fails alone.
    """
    pools = {}

    def get(world_size: int) -> DistributedPool:
        if world_size not in pools or pools[world_size].broken:
            pools[world_size] = DistributedPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
