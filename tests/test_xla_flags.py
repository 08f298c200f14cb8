"""The XLA settings ``import blayers`` applies (blayers.xla_flags): when each is added to
XLA_FLAGS, how it merges with the user's flags, and that this jaxlib accepts what it adds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from blayers import xla_flags
from blayers.xla_flags import (
    CPU_KERNELS,
    CPU_REDUCTIONS,
    EXTRA_OPTIONS,
    GPU_ATOMICS,
    apply,
    mentions,
    with_flag,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def knows_both(tmp_path: Path) -> Path:
    """A stand-in library whose compiler registers every setting's name."""
    lib = tmp_path / "libcompiler.so"
    names = (GPU_ATOMICS.name, CPU_REDUCTIONS.name, CPU_KERNELS.name)
    lib.write_bytes(b"\x7fELF...\x00" + b"\x00".join(n.encode() for n in names))
    return lib


@pytest.fixture
def knows_neither(tmp_path: Path) -> Path:
    lib = tmp_path / "libold.so"
    lib.write_bytes(b"\x7fELF... nvptx-allow-something-else xla_cpu_other_flag")
    return lib


def test_with_flag_appends_a_flag_or_joins_the_llvm_options() -> None:
    assert with_flag("", GPU_ATOMICS) == EXTRA_OPTIONS + GPU_ATOMICS.flag
    assert with_flag("--a=1", GPU_ATOMICS) == f"--a=1 {EXTRA_OPTIONS}{GPU_ATOMICS.flag}"
    flags = f"--a=1 {EXTRA_OPTIONS}-x-opt --b=2"
    assert with_flag(flags, GPU_ATOMICS) == f"--a=1 {EXTRA_OPTIONS}-x-opt,{GPU_ATOMICS.flag} --b=2"
    assert with_flag(EXTRA_OPTIONS, GPU_ATOMICS) == EXTRA_OPTIONS + GPU_ATOMICS.flag
    assert with_flag("--a=1", CPU_REDUCTIONS) == f"--a=1 {CPU_REDUCTIONS.flag}"


def test_mentions_reads_libraries_and_skips_unreadable_ones(
    tmp_path: Path, knows_both: Path, knows_neither: Path
) -> None:
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.so"
    assert mentions([knows_both], GPU_ATOMICS.name)
    assert mentions([knows_both], CPU_REDUCTIONS.name)
    assert not mentions([empty, knows_neither, missing], GPU_ATOMICS.name)
    assert not mentions([empty, knows_neither, missing], CPU_REDUCTIONS.name)
    assert mentions([empty, missing, knows_both], GPU_ATOMICS.name)


def test_each_setting_needs_its_name_in_the_compilers_that_read_it(
    knows_both: Path, knows_neither: Path
) -> None:
    def added(cuda: list[Path], jaxlib: list[Path]) -> tuple[list, str]:
        env = {"XLA_FLAGS": "--a=1"}
        with pytest.MonkeyPatch.context() as mp:  # as if no backend had started yet
            mp.setattr(xla_flags, "_backends_initialized", lambda: False)
            done = apply(env, cuda_libraries=cuda, jaxlib_libraries=jaxlib)
        return done, env["XLA_FLAGS"]

    assert added([], [knows_neither]) == ([], "--a=1")  # neither known: nothing added
    cpu = f"{CPU_REDUCTIONS.flag} {CPU_KERNELS.flag}"
    # no CUDA plugin: the CPU settings only
    assert added([], [knows_both]) == ([CPU_REDUCTIONS, CPU_KERNELS], f"--a=1 {cpu}")
    # a plugin whose compiler lacks the option: the CPU settings only
    assert added([knows_neither], [knows_both])[0] == [CPU_REDUCTIONS, CPU_KERNELS]
    # a plugin that knows it but a jaxlib that does not: nothing (jaxlib reads the flags too)
    assert added([knows_both], [knows_neither]) == ([], "--a=1")
    done, flags = added([knows_both], [knows_both])
    assert done == [GPU_ATOMICS, CPU_REDUCTIONS, CPU_KERNELS]
    assert flags == f"--a=1 {EXTRA_OPTIONS}{GPU_ATOMICS.flag} {cpu}"


@pytest.mark.parametrize(
    "flags, kept",
    [
        (f"{EXTRA_OPTIONS}-nvptx-allow-ftz-atomics", [GPU_ATOMICS]),
        ("--xla_gpu_ftz=false", [GPU_ATOMICS]),
        ("--xla_cpu_experimental_ynn_fusion_type=", [CPU_REDUCTIONS]),
        ("--xla_cpu_use_fusion_emitters=true", [CPU_KERNELS]),
    ],
    ids=["atomics set", "ftz chosen", "ynn chosen", "emitters chosen"],
)
def test_the_users_choice_is_kept(flags: str, kept: list, knows_both: Path) -> None:
    env = {"XLA_FLAGS": flags}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xla_flags, "_backends_initialized", lambda: False)
        done = apply(env, cuda_libraries=[knows_both], jaxlib_libraries=[knows_both])
    assert not set(done) & set(kept)
    assert env["XLA_FLAGS"].startswith(flags)
    env = {xla_flags.KEEP: "1", "XLA_FLAGS": flags}
    assert apply(env, cuda_libraries=[knows_both], jaxlib_libraries=[knows_both]) == []
    assert env == {xla_flags.KEEP: "1", "XLA_FLAGS": flags}


def test_after_the_backends_started_it_warns_and_changes_nothing(knows_both: Path) -> None:
    jax.devices()  # this process's backends are up
    env = {"XLA_FLAGS": "--a=1"}
    with pytest.warns(RuntimeWarning, match="import blayers first"):
        assert apply(env, cuda_libraries=[knows_both], jaxlib_libraries=[knows_both]) == []
    assert env == {"XLA_FLAGS": "--a=1"}


def test_import_blayers_sets_what_this_jaxlib_knows_and_it_compiles(knows_both: Path) -> None:
    """A fresh process: ``import blayers`` adds the CPU settings (this jaxlib knows them), the
    GPU option is added too given a plugin that knows it, and the installed jaxlib accepts
    both (a flag it did not know would end the process) and computes a scatter-add with
    repeated ids and a reduction exactly."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        import blayers
        from blayers.xla_flags import apply, GPU_ATOMICS
        after_import = os.environ["XLA_FLAGS"]
        assert apply(os.environ, cuda_libraries=[Path({str(knows_both)!r})]) == [GPU_ATOMICS]
        import jax, jax.numpy as jnp
        ids = jnp.array([3, 3, 3, 0, 3, 1], jnp.int32)
        out = jax.jit(lambda i: jnp.zeros(5).at[i].add(0.5))(ids)
        total = jax.jit(jnp.sum)(jnp.arange(1000.0))  # exact in float32
        print(after_import, "|", os.environ["XLA_FLAGS"], "|", out.tolist(), float(total))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != xla_flags.KEEP}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    after_import, flags, result = (part.strip() for part in proc.stdout.split("|"))
    cpu = f"{CPU_REDUCTIONS.flag} {CPU_KERNELS.flag}"
    assert after_import == f"--xla_force_host_platform_device_count=2 {cpu}"
    assert flags == f"{after_import} {EXTRA_OPTIONS}{GPU_ATOMICS.flag}"
    assert result == "[0.5, 0.5, 0.0, 2.0, 0.0] 499500.0"
