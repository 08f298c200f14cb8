"""The native-atomics option for GPU scatter-adds (blayers.gpu_atomics): when it is added to
XLA_FLAGS, how it merges with the user's flags, and that this jaxlib's compiler accepts it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from blayers import gpu_atomics
from blayers.gpu_atomics import EXTRA_OPTIONS, OPTION, mentions, use_native_atomics, with_option

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    """A stand-in for a CUDA plugin's library whose LLVM registers the option."""
    lib = tmp_path / "xla_cuda_plugin.so"
    lib.write_bytes(b"\x7fELF...cl::opt\x00" + OPTION.lstrip("-").encode() + b"\x00...")
    return lib


def test_with_option_adds_or_extends_the_extra_options() -> None:
    assert with_option("") == EXTRA_OPTIONS + OPTION
    assert with_option("--xla_force_host_platform_device_count=8") == (
        f"--xla_force_host_platform_device_count=8 {EXTRA_OPTIONS}{OPTION}"
    )
    flags = f"--a=1 {EXTRA_OPTIONS}-x-opt --b=2"
    assert with_option(flags) == f"--a=1 {EXTRA_OPTIONS}-x-opt,{OPTION} --b=2"
    assert with_option(f"{EXTRA_OPTIONS}") == EXTRA_OPTIONS + OPTION


def test_mentions_reads_libraries_and_skips_unreadable_ones(tmp_path: Path, plugin: Path) -> None:
    empty, other = tmp_path / "empty.so", tmp_path / "other.so"
    empty.write_bytes(b"")
    other.write_bytes(b"nvptx-allow-something-else")
    assert mentions([plugin])
    assert not mentions([empty, other, tmp_path / "missing.so"])
    assert mentions([empty, tmp_path / "missing.so", plugin])


def test_no_plugin_or_a_compiler_without_the_option_leaves_the_flags(
    tmp_path: Path, plugin: Path
) -> None:
    lib = tmp_path / "plain.so"
    lib.write_bytes(b"no such name here")
    env = {"XLA_FLAGS": "--a=1"}
    assert not use_native_atomics(env, plugin_libraries=[])
    assert not use_native_atomics(env, plugin_libraries=[lib])
    assert not use_native_atomics(env, plugin_libraries=[plugin], jaxlib_libraries=[lib])
    assert env == {"XLA_FLAGS": "--a=1"}


@pytest.mark.parametrize(
    "env",
    [
        {gpu_atomics.OPT_OUT: "1"},
        {"XLA_FLAGS": f"{EXTRA_OPTIONS}{OPTION}"},
        {"XLA_FLAGS": "--xla_gpu_ftz=false"},
    ],
    ids=["opted out", "already set", "user chose ftz"],
)
def test_the_users_choice_is_kept(env: dict[str, str], plugin: Path) -> None:
    before = dict(env)
    assert not use_native_atomics(env, plugin_libraries=[plugin], jaxlib_libraries=[plugin])
    assert env == before


def test_after_the_backends_started_it_warns_and_changes_nothing(plugin: Path) -> None:
    jax.devices()  # this process's backends are up
    env = {"XLA_FLAGS": "--a=1"}
    with pytest.warns(RuntimeWarning, match="import blayers first"):
        assert not use_native_atomics(env, plugin_libraries=[plugin], jaxlib_libraries=[plugin])
    assert env == {"XLA_FLAGS": "--a=1"}


def test_a_fresh_process_gets_the_option_and_this_jaxlib_compiles_with_it(plugin: Path) -> None:
    """Before the backends start the option lands in XLA_FLAGS, and the installed jaxlib's
    compiler accepts it (an option LLVM does not know ends the process) and computes a
    scatter-add with repeated ids exactly."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from blayers.gpu_atomics import use_native_atomics
        assert use_native_atomics(os.environ, plugin_libraries=[Path({str(plugin)!r})])
        import jax, jax.numpy as jnp
        ids = jnp.array([3, 3, 3, 0, 3, 1], jnp.int32)
        out = jax.jit(lambda i: jnp.zeros(5).at[i].add(0.5))(ids)
        print(os.environ["XLA_FLAGS"], out.tolist())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != gpu_atomics.OPT_OUT}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags, _, values = proc.stdout.strip().partition(" [")
    assert flags == f"--xla_force_host_platform_device_count=2 {EXTRA_OPTIONS}{OPTION}"
    assert values == "0.5, 0.5, 0.0, 2.0, 0.0]"
