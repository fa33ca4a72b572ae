#!/usr/bin/env bash
# The GPU acceptance check, run on the GPU machine from the repository root:
#   configure (CUDA on) into build-gpu, build with every core, run the GPU tests and the CPU
#   tests, then a short training run on the GPU (and the same run on the CPU for comparison),
#   and print one line per stage.  Every stage runs and reports even when an earlier one failed
#   (stages that need the build are marked "skip" when it failed).
#
#   scripts/gpu-check.sh                 # logs in build-gpu/gpu-check-logs/
#   OUT=/some/dir scripts/gpu-check.sh   # also copies the logs to $OUT/gpu-check/
#
# Environment: BUILD_DIR (default build-gpu), JOBS (default: all cores), TRAIN_STEPS (default 40),
# STAGE_TIMEOUT seconds per stage (default 900).  Exit status: 0 when every stage passed.
. "$(dirname "$0")/help.sh"
set -u
cd "$(dirname "$0")/.."
. scripts/gpus.sh
require_gpus 1 gpu-check

export NCCL_NVLS_ENABLE=0  # NVLink SHARP multicast stays off on the shared machines
BUILD_DIR=${BUILD_DIR:-build-gpu}
JOBS=${JOBS:-$(nproc)}
TRAIN_STEPS=${TRAIN_STEPS:-40}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-900}
LOG_DIR="$BUILD_DIR/gpu-check-logs"
mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/*.log

stages=()
results=()
times=()
notes=()

# run_stage NAME NOTE-COMMAND -- COMMAND...: runs COMMAND with its output in LOG_DIR/NAME.log
# (and the last lines on the console), records pass/fail and the time taken.
run_stage() {
  local name=$1
  shift
  local log="$LOG_DIR/$name.log"
  local start end rc
  echo "=== $name: $*"
  start=$(date +%s)
  timeout "$STAGE_TIMEOUT" "$@" >"$log" 2>&1
  rc=$?
  end=$(date +%s)
  tail -n 25 "$log"
  local result=pass
  [ $rc -ne 0 ] && result="FAIL (rc $rc)"
  [ $rc -eq 124 ] && result="FAIL (timeout ${STAGE_TIMEOUT}s)"
  stages+=("$name")
  results+=("$result")
  times+=("$((end - start))")
  notes+=("")
}

skip_stage() {
  stages+=("$1")
  results+=("skip")
  times+=("0")
  notes+=("$2")
}

set_note() { notes[${#notes[@]}-1]="$1"; }

# ------------------------------------------------------------------ device
run_stage device nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv

# ------------------------------------------------------------------ configure and build
run_stage configure cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBARRIERLM_CUDA=ON
if [ "${results[-1]}" = pass ]; then
  run_stage build cmake --build "$BUILD_DIR" -j "$JOBS"
  [ "${results[-1]}" = pass ] && built=1 || built=0
else
  skip_stage build "configure failed"
  built=0
fi

# ------------------------------------------------------------------ tests
if [ $built -eq 1 ] || [ -x "$BUILD_DIR/tests/test_gpu" ]; then
  # -V keeps the Catch2 output (assertion totals, durations) in the log on success too.
  run_stage gpu-tests ctest --test-dir "$BUILD_DIR" -L gpu --output-on-failure -V
  # ctest passes a skipped test: say so, a GPU check that ran nothing has not passed.
  if grep -q "Skipped\|Not Run" "$LOG_DIR/gpu-tests.log"; then
    results[-1]="FAIL (skipped: no GPU visible?)"
  fi
  set_note "$(grep -E 'All tests passed|test cases:' "$LOG_DIR/gpu-tests.log" | tail -1 | sed 's/^[0-9]*: //')"
  case "${results[-1]}" in pass | *skipped*) rerun=0 ;; *) rerun=1 ;; esac
  if [ $rerun -eq 1 ] && [ -x "$BUILD_DIR/tests/test_gpu" ]; then
    # Again with a synchronise after every launch, so an asynchronous fault names its kernel.
    # ([graphs] is left out: BLM_CUDA_SYNC turns the CUDA graphs off, so its launch counts fail.)
    run_stage gpu-tests-sync env BLM_CUDA_SYNC=1 "$BUILD_DIR/tests/test_gpu" -d yes "~[graphs]"
    set_note "$(grep -E 'All tests passed|test cases:' "$LOG_DIR/gpu-tests-sync.log" | tail -1)"
  fi
  run_stage cpu-tests ctest --test-dir "$BUILD_DIR" -L cpu --output-on-failure -j "$JOBS"
  set_note "$(grep -Eo '[0-9]+% tests passed.*' "$LOG_DIR/cpu-tests.log" | head -1)"
else
  skip_stage gpu-tests "no build"
  skip_stage cpu-tests "no build"
fi

# ------------------------------------------------------------------ a short training run
# Text: the Brown corpus when present (scripts/get-data.sh), else the repository's own text files.
# configs/tiny.yaml with one head (head size 32: the CUDA kernels support 32, 64 and 128).
BIN="$BUILD_DIR/cmd/barrierlm"
WORK="$BUILD_DIR/gpu-check-run"
if [ -x "$BIN" ] && "$BIN" train --help >/dev/null 2>&1; then
  rm -rf "$WORK"
  mkdir -p "$WORK"
  if [ -f data/corpus/brown/train.txt ] && [ -f data/corpus/brown/val.txt ]; then
    train_txt=data/corpus/brown/train.txt
    val_txt=data/corpus/brown/val.txt
  else
    find . -path "./$BUILD_DIR" -prune -o -path ./.git -prune -o -path './build*' -prune -o \
      \( -name '*.md' -o -name '*.yaml' -o -name '*.h' -o -name '*.cpp' \) -type f -print0 |
      sort -z | xargs -0 cat >"$WORK/all.txt"
    total=$(wc -c <"$WORK/all.txt")
    head -c $((total * 9 / 10)) "$WORK/all.txt" >"$WORK/train.txt"
    tail -c $((total - total * 9 / 10)) "$WORK/all.txt" >"$WORK/val.txt"
    train_txt="$WORK/train.txt"
    val_txt="$WORK/val.txt"
  fi
  for backend in cuda cpu; do
    run_stage "train-$backend" "$BIN" train configs/tiny.yaml \
      --set device.backend=$backend --set device.precision=fp32 --set model.n_head=1 \
      --set data.train="$train_txt" --set data.val="$val_txt" \
      --set train.steps="$TRAIN_STEPS" --set train.out_dir="$WORK/runs" \
      --set train.run_name="$backend"
    set_note "$(grep -E '^done:|error' "$LOG_DIR/train-$backend.log" | tail -1 | cut -c1-110)"
  done
  # The bf16 default replays each training step as a CUDA graph with programmatic dependent
  # launches, and the evals in between run other calls on the same arena: three short bf16 runs
  # of the paper size (graphs and PDL on; graphs off; PDL off) must log the same metrics bit for
  # bit (timings aside); at lambda 0 (bf16 qkv, cuDNN attention) and with the sampled barrier
  # (fp32 qkv).
  graphs_vs_eager() {
    local lam g rc=0
    for lam in 0 0.03; do
      for g in 1:1 0:1 1:0; do
        BLM_CUDA_GRAPHS=${g%%:*} BLM_PDL=${g##*:} "$BIN" train configs/paper-size.yaml --quiet \
          --set device.backend=cuda \
          --set data.train="$train_txt" --set data.val="$val_txt" --set train.steps=60 \
          --set train.eval_interval=20 --set train.eval_batches=4 --set barrier.lambda=$lam \
          --set barrier.positions=32 --set train.checkpoint_interval=0 \
          --set train.out_dir="$WORK/graphs" --set train.run_name="graphs${g/:/-pdl}-lambda$lam" ||
          return 1
      done
      python3 - "$WORK/graphs/graphs1-pdl1-lambda$lam/metrics.jsonl" \
        "$WORK/graphs/graphs0-pdl1-lambda$lam/metrics.jsonl" \
        "$WORK/graphs/graphs1-pdl0-lambda$lam/metrics.jsonl" "$lam" <<'PYEOF' || rc=1
import json, sys
def records(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed")}
            for line in open(path)]
graphs, eager, no_pdl = records(sys.argv[1]), records(sys.argv[2]), records(sys.argv[3])
same = graphs == eager == no_pdl and len(graphs) > 0
print(f"graphs vs eager vs no PDL, lambda {sys.argv[4]}: {len(graphs)} records, "
      f"{'identical' if same else 'DIFFERENT'}; last {graphs[-1]}")
sys.exit(0 if same else 1)
PYEOF
    done
    return $rc
  }
  export -f graphs_vs_eager  # (timeout runs a program: the function goes to a child bash)
  export BIN WORK train_txt val_txt
  run_stage train-graphs bash -c graphs_vs_eager
  set_note "$(grep -Eo '^graphs vs eager vs no PDL, lambda [0-9.]+: [0-9]+ records, [A-Za-z]+' \
    "$LOG_DIR/train-graphs.log" | sed 's/graphs vs eager vs no PDL, //' | paste -sd ';' -)"
  # The flash barrier's products: the forward's S on mma.sync (the default at T 256) or wgmma
  # (BLM_BARRIER_S), the backward's X and Y on bf16 mma (default), TF32 mma or TF32 wgmma
  # (BLM_BARRIER_BWD): the paper size's training step at lambda 0.03, exact barrier, each way.
  barrier_wgmma_steps() {
    local v
    for v in mma:bf16 mma:mma wgmma:mma wgmma:wgmma; do
      echo "S, backward on ${v%%:*}, ${v##*:}: $(BLM_BARRIER_S=${v%%:*} BLM_BARRIER_BWD=${v##*:} \
        "$BIN" bench configs/paper-size.yaml --set device.backend=cuda --set barrier.lambda=0.03 \
        --set barrier.positions=0 --steps 10 --warmup 3 | grep -Eo 'median [0-9.]+ ms')" || return 1
    done
  }
  export -f barrier_wgmma_steps
  run_stage step-wgmma bash -c barrier_wgmma_steps
  set_note "$(grep -E '^S, backward on' "$LOG_DIR/step-wgmma.log" |
    sed 's/S, backward on //' | paste -sd ';' -)"
else
  skip_stage train-cuda "no barrierlm train command in this build"
  skip_stage train-cpu "no barrierlm train command in this build"
  skip_stage train-graphs "no barrierlm train command in this build"
  skip_stage step-wgmma "no barrierlm train command in this build"
fi

# ------------------------------------------------------------------ PyTorch cross-check
# (stage owned by "torch": scripts/crosscheck.py, scripts/py/)  The PyTorch peer checks itself
# (float64: its two barrier forms, the generator Jacobian, gradcheck, a finite difference of the
# whole model); then `barrierlm gradients` of the checkpoint trained above, on the first 4
# validation windows, from the CPU (fp64, fp32) and the GPU (fp32; lambda 1, where the barrier
# dominates layer 0's q/k gradient, and lambda 0), each compared with float64 autograd on the GPU
# (per-tensor relative error <= tol); last, PyTorch's time for the barrier alone.
PY=${PYTHON:-python3}
XCHECKS=("cpu fp64 1 1e-6" "cpu fp32 1 1e-4" "cuda fp32 1 1e-4" "cuda fp32 0 1e-4")
XCK="$WORK/runs/cuda/checkpoint.bin"
[ -f "$XCK" ] || XCK="$WORK/runs/cpu/checkpoint.bin"
# crosscheck_one BACKEND PRECISION LAMBDA TOL: gradients into a fresh directory, then compare.
crosscheck_one() {
  local dir="$WORK/grads-$1-$2-lambda$3"
  rm -rf "$dir"
  "$BIN" gradients "$XCK" --data "$val_txt" --batch 4 --lambda "$3" --backend "$1" \
    --precision "$2" --out "$dir" && "$PY" scripts/crosscheck.py "$XCK" "$dir" --device cuda --tol "$4"
}
export -f crosscheck_one
xcheck_name() { echo "xc-$1-$2-l$3"; }  # e.g. xc-cuda-fp32-l1
export BIN WORK PY XCK val_txt="${val_txt:-}"
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  skip_stage torch-selfcheck "no PyTorch for $PY"
  for x in "${XCHECKS[@]}"; do skip_stage "$(xcheck_name $x)" "no PyTorch"; done
  skip_stage torch-bench "no PyTorch"
else
  run_stage torch-selfcheck "$PY" scripts/py/test_blm_torch_selfcheck.py
  set_note "$(grep -E 'checks passed' "$LOG_DIR/torch-selfcheck.log" | tail -1)"
  for x in "${XCHECKS[@]}"; do
    # shellcheck disable=SC2086  # x is four words: backend precision lambda tol
    name=$(xcheck_name $x)
    if [ -x "$BIN" ] && [ -f "$XCK" ] && [ -n "${val_txt:-}" ]; then
      # shellcheck disable=SC2086  # x is four words: backend precision lambda tol
      run_stage "$name" bash -c 'crosscheck_one "$@"' _ $x
      set_note "$(grep -E '^whole gradient' "$LOG_DIR/$name.log" | cut -c1-100)"
    else
      skip_stage "$name" "no barrierlm build or no trained checkpoint"
    fi
  done
fi

# ------------------------------------------------------------------ barrier timing
# The barrier alone, barrierlm's kernels and PyTorch autograd (scripts/py/bench_barrier.py), on the
# same shapes and the same counted work (docs/PERFORMANCE.md): GPT-2-small-like heads and the
# paper's size.
BENCH_SHAPES=${BENCH_SHAPES:-"8,12,1024,64 64,6,256,64"}
for shape in $BENCH_SHAPES; do
  tag=${shape//,/x}
  if [ -x "$BUILD_DIR/tests/test_gpu" ]; then
    run_stage "bench-blm-$tag" env BLM_BENCH_SHAPE="$shape" "$BUILD_DIR/tests/test_gpu" "[.bench]"
    set_note "$(grep -E '^barrier (kernels|flash)' "$LOG_DIR/bench-blm-$tag.log" |
      sed -E 's/^barrier (kernels|flash).*forward\+backward ([0-9.]+) ms \(([0-9.]+) TFLOP.*/\1 \2 ms (\3 TF\/s)/' | paste -sd ' ' -)"
  else
    skip_stage "bench-blm-$tag" "no GPU test build"
  fi
  if "$PY" -c 'import torch' >/dev/null 2>&1; then
    run_stage "bench-torch-$tag" "$PY" scripts/py/bench_barrier.py --shape "$shape"
    set_note "$(grep -E '^forward\+backward' "$LOG_DIR/bench-torch-$tag.log" | tr -s ' ' | cut -c1-100)"
  else
    skip_stage "bench-torch-$tag" "no PyTorch"
  fi
done

# ------------------------------------------------------------------ summary
echo
echo "=== gpu-check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(scripts/commit-id.sh))"
printf '%-15s %-34s %7s  %s\n' stage result seconds note
failed=0
for i in "${!stages[@]}"; do
  printf '%-15s %-34s %7s  %s\n' "${stages[$i]}" "${results[$i]}" "${times[$i]}" "${notes[$i]}"
  case "${results[$i]}" in pass | skip) ;; *) failed=1 ;; esac
done
echo "logs: $LOG_DIR"
if [ -n "${OUT:-}" ]; then
  # One archive: the device tool returns at most 8 files.
  runs=()
  [ -d "$WORK/runs" ] && runs=(-C "$(cd "$WORK" && pwd)" runs)
  mkdir -p "$OUT" &&
    tar czf "$OUT/gpu-check-logs.tgz" -C "$(cd "$LOG_DIR" && pwd)" . "${runs[@]}" &&
    echo "logs archived to $OUT/gpu-check-logs.tgz"
fi
exit $failed
