#!/bin/sh
# Wheels of the packages this project needs that a GPU machine's image lacks (its Python 3.12
# has jax with CUDA, numpyro, optax, orbax-checkpoint and pyarrow, but not grain or hydra),
# at the versions in constraints.txt, into DEST (default .whl/, which git ignores).
# Run where pip reaches a package index; then carry DEST to the GPU machine, where
# benchmarks/gpu/session.sh installs them. No GPU is needed to run this.
set -eu
DEST=${1:-.whl}
PY=${PY:-python3}
cd "$(dirname "$0")/../.."
pin() { grep -i -E "^$1==" constraints.txt; }
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" \
    "$(pin grain)" "$(pin 'array[-_]record')" "$(pin portpicker)" "$(pin hydra-core)" \
    "$(pin omegaconf)"
# antlr4's 4.9 runtime (hydra's parser) is published as a source archive only: pure Python,
# so a wheel built here installs anywhere
"$PY" -m pip wheel -q --no-deps -w "$DEST" "$(pin antlr4-python3-runtime)"
ls "$DEST"
