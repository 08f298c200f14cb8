#!/bin/bash
# The GPU figures of the performance benchmarks in one time-boxed run (about 9 minutes), for a
# GPU machine lent for a short while. Each stage has its own time limit, so one slow stage
# cannot use up the others' time; each writes its output to $OUT (default ./gpu-out).
#
#   benchmarks/gpu/wheels.sh                  # here, once: wheels of what the image lacks
#   bash benchmarks/gpu/session.sh            # there, with .whl/ carried along
#   bash benchmarks/gpu/session.sh --smoke    # anywhere, in a minute: tiny sizes, on CPU
#
# Stages: the row-sparse step at c = 10^7 for random effects (batch 4,096 to 65,536), then
# embedding and FM, beside hand-written NumPyro and the step's byte-traffic floor
# (benchmarks/accelerator_step.py); the step fed by the data stage against step-only at
# c = 10^6; the main job end to end (train, summary, score, report), each stage's wall time.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/blayers-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/blayers-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "${1:-}" = "--smoke" ]; then
    export JAX_PLATFORMS=cpu
    CATS_BIG=1000 CATS_E2E=1000 RE_BATCHES=512 TERM_BATCHES=512 E2E_BATCHES=512
    ROWS=20000 MAIN_JOB="data.batch_size=2048 train.steps=30"
    BOX_RE=240 BOX_TERMS=240 BOX_E2E=240 BOX_MAIN=240
else
    CATS_BIG=10000000 CATS_E2E=1000000 RE_BATCHES=4096,16384,65536 TERM_BATCHES=16384,65536
    E2E_BATCHES=4096,65536 ROWS=1000000 MAIN_JOB="data.batch_size=65536 train.steps=1500"
    BOX_RE=170 BOX_TERMS=150 BOX_E2E=80 BOX_MAIN=130
fi

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, output to $OUT/NAME.txt
    local name=$1 box=$2
    shift 2
    echo "== $name (at most ${box}s): $*"
    local t0=$SECONDS
    timeout "$box" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/$name.txt"
    tail -n 12 "$OUT/$name.txt"
}

{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import blayers, jax, os; print('jax', jax.__version__, jax.devices()); \
print('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage re_step "$BOX_RE" "$PY" benchmarks/accelerator_step.py --terms random_effects \
    --cats "$CATS_BIG" --batches "$RE_BATCHES" --e2e-cats ''
stage terms_step "$BOX_TERMS" "$PY" benchmarks/accelerator_step.py --terms embedding,fm \
    --cats "$CATS_BIG" --batches "$TERM_BATCHES" --e2e-cats ''
stage fed_step "$BOX_E2E" "$PY" benchmarks/accelerator_step.py --terms '' \
    --e2e-cats "$CATS_E2E" --e2e-batches "$E2E_BATCHES"

main_job() {  # the main job's stages, each timed; the data is generated first (not timed)
    local run=/tmp/blayers-gpu-run data=/tmp/blayers-gpu-data/train.parquet
    rm -rf "$run"
    "$PY" -m train.synth "$data" --rows "$ROWS" >/dev/null || return 1
    local fn t0
    for fn in train_main summary_main score_main; do
        local args="run_dir=$run"
        [ "$fn" = score_main ] && args="$args data.path=$data"
        [ "$fn" = train_main ] && args="$args data.path=$data train.progress=false $MAIN_JOB"
        t0=$SECONDS
        # the overrides are separate words on purpose; hydra reads them from sys.argv[1:]
        # shellcheck disable=SC2086
        "$PY" -c "from train.cli import $fn; $fn()" $args || return 1
        echo "stage $fn: $((SECONDS - t0)) s"
    done
    t0=$SECONDS
    "$PY" -m train.report "$run" || return 1
    echo "stage report: $((SECONDS - t0)) s"
}
export -f main_job
export PY ROWS MAIN_JOB
stage main_job "$BOX_MAIN" bash -c main_job
echo "outputs in $OUT"
