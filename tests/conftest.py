"""Fake 8 CPU devices before JAX starts, so sharding is exercised without accelerators."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        # a collective that lost a participant fails the test fast instead of hanging it
        "--xla_cpu_collective_call_terminate_timeout_seconds=120",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one compilation cache per test session, made by the first process (xdist's controller, which
# loads this file before it starts the workers) and shared by every worker and the processes
# they start: the suite compiles the same small steps dozens of times (40% of the fault tests'
# time). Removed when the session ends, unless it was the caller's own.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="blayers-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import blayers  # noqa: E402, F401  (its XLA settings, before any test starts a backend)

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
    "test_new_links_service.py",
    "test_upstream_layers.py",
    "test_upstream_smoothers.py",
    "test_upstream_priors.py",
    "test_new_links.py",
    "test_guides.py",
    "test_faults.py",
    "test_fixed_effects.py",
    "test_loop.py",
    "test_compile_cache.py",
    "test_fm_rows.py",
    "test_ordered_tables.py",
    "test_smooth.py",
    "test_coupling_rate.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
