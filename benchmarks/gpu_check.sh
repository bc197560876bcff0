#!/usr/bin/env bash
# The GPU check (issue 14): one command for a lent GPU machine that has torch, lightning and
# timm but neither hydra nor omegaconf and cannot download anything.
#
#   make gpu-wheels                                   # here, where pip reaches the registry
#   OUT=<folder> bash benchmarks/gpu_check.sh         # there, with .gpu-wheels carried
#   OUT=<folder> bash benchmarks/gpu_check.sh --cpu   # rehearsal here, tiny sizes (a test runs it)
#
# Steps, each under `timeout` and all within GPU_CHECK_BUDGET_S (470 s, so under 8 minutes):
#   install     the carried wheels offline and the project without dependencies (skipped when
#               they import already);
#   cuda_tests  pytest -m cuda tests/test_cuda.py (skipped tests without CUDA);
#   prepare     the synthetic set at the paper's 256 px (tiny with --cpu) and a BMP copy of it;
#   throughput  CAL, ResNet-50, batch 128, bf16-mixed, channels_last: train images/s through
#               the DataModule with 8 and 16 workers and with the batch already on the GPU;
#   e2e         one short `python run.py ... trainer=gpu logger=csv` CAL run.
# Then $OUT/gpu_check.json (every step's figures, status and error), $OUT/cal_results.json and
# $OUT/gpu_check.log. A failed step is recorded and the next one still runs; the exit status
# is non-zero when any step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE=gpu
case "${1:-}" in
    --cpu) MODE=cpu ;;
    "") ;;
    *) echo "usage: OUT=<folder> bash benchmarks/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder the figures are written to}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ $MODE == cpu && -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
if [[ -n "${GPU_CHECK_WORK:-}" ]]; then
    WORK=$GPU_CHECK_WORK
else  # outside the carried tree and $OUT: the 256 px set is over a GiB
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/owdfa-gpu-check.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
STEPS=$WORK/steps
mkdir -p "$STEPS"
export OWDFA_BENCH_CACHE=$WORK/cache WANDB_MODE=disabled PYTHONUNBUFFERED=1
# install's --target (the machine's environment stays as it is); the repo importable even if
# the project install fails
SITE=$WORK/site
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}

if [[ $MODE == gpu ]]; then
    NPROC=$(nproc)
    DATA=(data=synth data.image_size=256 data.backbone.name=resnet50 data.backbone.pretrained=false
          ++data.pretrain=null "data.root=$WORK/synth-256"
          data.generator.real_per_folder=400 data.generator.fakes_per_class=160
          data.budgets.real=800 data.budgets.real_per_folder=400 data.budgets.known=160
          data.budgets.novel=120)  # 7,200 images, ~5,000 train rows: ~40 steps of 128 an epoch
    METHOD=(method=cal method.batch_size=128)
    TRAINER=(trainer=gpu trainer.progress_bar=false)
    CASES=loader:8,loader:16,ceiling,loader_only:16,loader_bmp:16,ceiling_benchmark,ceiling_model_cl
    WARMUP=10; MEASURE=25; PREP_WORKERS=$(( NPROC > 1 ? NPROC - 1 : 1 ))
    E2E=(trainer.max_epochs=2 trainer.limit_train_batches=10 trainer.limit_val_batches=4)
    CAPS=(install=90 cuda_tests=120 prepare=90 throughput=170 e2e=120)
else
    DATA=(data=synth data.image_size=32 data.backbone.name=resnet18 data.backbone.pretrained=false
          ++data.pretrain=null "data.root=$WORK/synth-32"
          data.generator.real_per_folder=6 data.generator.fakes_per_class=5
          data.budgets.real=8 data.budgets.real_per_folder=4 data.budgets.known=5
          data.budgets.novel=4)
    METHOD=(method=cal method.batch_size=4)
    TRAINER=(trainer=cpu trainer.channels_last=true trainer.threads=1 trainer.progress_bar=false)
    CASES=loader:0,loader:2,ceiling,loader_only:2,loader_bmp:2,ceiling_benchmark,ceiling_model_cl
    WARMUP=1; MEASURE=2; PREP_WORKERS=1
    E2E=(trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1)
    CAPS=(install=60 cuda_tests=90 prepare=60 throughput=120 e2e=90)
fi

BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$SECONDS
cap_of() { local kv; for kv in "${CAPS[@]}"; do [[ ${kv%%=*} == "$1" ]] && echo "${kv#*=}"; done; }

# run_step NAME CMD...: under `timeout` (its cap, or what is left of the budget); rc, seconds,
# limit and log go to $STEPS. timeout signals the whole process group (loader workers too).
run_step() {
    local name=$1; shift
    local cap left limit t0 rc
    cap=$(cap_of "$name")
    left=$(( BUDGET - (SECONDS - START) - 15 ))  # 15 s kept for the report
    limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        echo "not run: ${BUDGET} s budget spent" >"$STEPS/$name.log"
        echo skipped >"$STEPS/$name.rc"
        echo "== $name: skipped (budget spent)"
        return
    fi
    echo "== $name (limit ${limit} s)"
    echo "$limit" >"$STEPS/$name.limit_s"
    t0=$(date +%s.%N)
    timeout -k 5 "$limit" "$@" >"$STEPS/$name.log" 2>&1
    rc=$?
    echo "$rc" >"$STEPS/$name.rc"
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }' >"$STEPS/$name.seconds"
    echo "   rc=$rc, $(cat "$STEPS/$name.seconds") s"
}

HELPER=benchmarks/gpu_check.py
run_step install "$PY" "$HELPER" install --wheels .gpu-wheels --target "$SITE" \
    --out-json "$STEPS/install.json"
run_step cuda_tests "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
    --junitxml="$STEPS/cuda_tests.xml"
run_step prepare "$PY" "$HELPER" prepare --out-json "$STEPS/prepare.json" \
    --workers "$PREP_WORKERS" --bmp-mirror "$WORK/synth-bmp" -- "${DATA[@]}" "${METHOD[@]}"
run_step throughput "$PY" "$HELPER" bench --out-json "$STEPS/throughput.json" --cases "$CASES" \
    --warmup "$WARMUP" --steps "$MEASURE" --bmp-root "$WORK/synth-bmp" \
    -- "${DATA[@]}" "${METHOD[@]}" "${TRAINER[@]}"
run_step e2e "$PY" run.py "${DATA[@]}" "${METHOD[@]}" "${TRAINER[@]}" "${E2E[@]}" logger=csv \
    force=true "output_root=$WORK/outputs" sweep_name=gpu_check
RESULTS=$(find "$WORK/outputs/gpu_check" -name results.json 2>/dev/null | head -n 1)
[[ -n $RESULTS ]] && cp "$RESULTS" "$OUT/cal_results.json"  # a failed run's record too

for name in install cuda_tests prepare throughput e2e; do
    [[ -f $STEPS/$name.log ]] || continue
    echo "======== $name"
    tail -c 1000000 "$STEPS/$name.log"
done >"$OUT/gpu_check.log"

timeout 60 "$PY" "$HELPER" report --steps-dir "$STEPS" --out "$OUT" --mode "$MODE" \
    --wall-s "$(( SECONDS - START ))"
rc=$?
if [[ ! -s $OUT/gpu_check.json ]]; then  # the report itself failed: say so in the JSON
    printf '{"check": "owdfa-bench gpu_check (issue 14)", "mode": "%s", "ok": false, %s}\n' \
        "$MODE" '"error": "the report step failed; see gpu_check.log"' >"$OUT/gpu_check.json"
    rc=1
fi
exit "$rc"
