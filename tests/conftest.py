"""Fake 8 CPU devices before JAX starts, so sharding is exercised without accelerators."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        # a collective that lost a participant fails the test fast instead of hanging it
        "--xla_cpu_collective_call_terminate_timeout_seconds=120",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# the slowest files start first, so that on a few cores (``-n auto --dist loadfile``) the
# quick ones fill the tail instead of one long file running alone at the end
SLOW_FILES = (
    "test_multiprocess.py",
    "test_coverage.py",
    "test_posterior_vs_nuts.py",
    "test_guides.py",
    "test_faults.py",
    "test_service_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))
