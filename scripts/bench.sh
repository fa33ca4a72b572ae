#!/usr/bin/env bash
# barrierlm against PyTorch on one GPU: the numbers of docs/PERFORMANCE.md, in one command run on
# the GPU machine from the repository root:
#
#   scripts/bench.sh                    # table on stdout; logs + JSON in build-gpu/bench/
#   OUT=/some/dir scripts/bench.sh      # also $OUT/bench.tar.gz (every log and JSON, one file)
#   scripts/bench.sh check              # first: build everything and run the GPU tests of the
#                                       # bf16 path and of the kernels / backend it touched
#                                       # ($OUT/bench-check.tar.gz); then run the bench
#
# Stages (each logged, timed and reported even when an earlier one failed):
#   build      cmake configure (CUDA on) + build of the barrierlm target in $BUILD_DIR (incremental
#              when scripts/gpu-check.sh built there already)
#   peak       the bf16 matmul peak for MFU: torch.matmul 8192^3 bf16 on random data
#   per case, barrierlm then PyTorch (alternating; ROUNDS=2 repeats each pair):
#     a-lam0           (a) GPT-2 small V=50304 T=1024 L=12 H=12 d=768 B=16, lambda 0
#     a-lam0.03-K64    (a) lambda 0.03, sampled estimator, 64 positions/sequence (barrierlm only;
#                      TORCH_SAMPLED=1 adds PyTorch, which computes every position and masks)
#     b-lam0           (b) paper size: bytes, T=256 L=6 H=6 d=384 B=64, lambda 0
#     b-lam0.03-exact  (b) lambda 0.03, exact barrier (PyTorch: autograd of the same objective)
#   track      bf16 vs fp32: 500-step training runs of (b) on text, one per precision and seed
#              (TRACK_SEEDS, concurrently), validation CE at the end
#   report     scripts/py/bench_report.py: the table, ratios, MFU, peak memory, acceptance checks
#
# Both sides: same model, batch, sequence, AdamW (lr, betas, eps, weight decay on matrices and
# embeddings), global-norm clip 1.0, random tokens; median step time over STEPS after WARMUP
# (PyTorch compiles in its warmup).  barrierlm precision: PRECISION (default auto = bf16 on the
# GPU; the table shows what ran).  PyTorch: torch.compile, SDPA, bf16 autocast
# with fp32 master weights, fused AdamW.
#
# barrierlm runs its defaults: flash attention and, in bf16, the flash-style barrier (TF32
# forward tiles, bf16 backward products);
# BLM_ATTENTION=gemm / BLM_BARRIER=kernels|gemm in the environment select the alternatives.
# Environment: BUILD_DIR (build-gpu), STEPS (20), WARMUP (5; PyTorch gets at least 3), ROUNDS (1),
# PRECISION (auto), TRACK_STEPS (500, 0 skips), TRACK_SEEDS ("1337 1 2": one bf16 and one fp32
# run per seed), TRACK_LAMBDA (0.03), TRACK_POSITIONS (32: the
# sampled barrier, so the fp32 run fits its stage; 0 = exact), TORCH_SAMPLED (0),
# VARIANTS (opt-in environment settings benched at lambda 0 beside the defaults; see below),
# BARRIER_VARIANTS (the same for the lambda > 0 cases; default: the TF32 backward products),
# POSITIONS_SWEEP (other sampled position counts for the (a) lambda 0.03 case: "8 16 32"),
# CASES (default all four: a subset, e.g. "a-lam0 b-lam0", for a quick comparison; "" runs none,
# e.g. for the tracking alone),
# BUDGET seconds for the whole script (450): a stage that would start after it is skipped, and no
# stage runs past BUDGET + 100 s.
# Exit status: 0 when every stage that ran passed (the acceptance lines are results, not stages).
. "$(dirname "$0")/help.sh"
set -u
cd "$(dirname "$0")/.." || exit 1
. scripts/gpus.sh
require_gpus 1 bench
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1

BUILD_DIR=${BUILD_DIR:-build-gpu}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
ROUNDS=${ROUNDS:-1}
PRECISION=${PRECISION:-auto}
TRACK_STEPS=${TRACK_STEPS:-500}
TRACK_SEEDS=${TRACK_SEEDS:-"1337 1 2"}
TRACK_LAMBDA=${TRACK_LAMBDA:-0.03}
TRACK_POSITIONS=${TRACK_POSITIONS:-32}
TORCH_SAMPLED=${TORCH_SAMPLED:-0}
CASES=${CASES-"a-lam0 a-lam0.03-K64 b-lam0 b-lam0.03-exact"}
BUDGET=${BUDGET:-450}
MODE=${1:-bench}
case $MODE in bench | check) ;; *) echo "usage: scripts/bench.sh [check]" >&2; exit 2 ;; esac
BIN="$BUILD_DIR/cmd/barrierlm"
WORK="$BUILD_DIR/bench"
[ "$MODE" = check ] && WORK="$BUILD_DIR/bench-check"
PY=scripts/py
TORCH_WARMUP=$((WARMUP < 3 ? 3 : WARMUP))
case $BUILD_DIR in /*) build_abs=$BUILD_DIR ;; *) build_abs=$PWD/$BUILD_DIR ;; esac
export TORCHINDUCTOR_CACHE_DIR="$build_abs/torchinductor-cache"  # reused by a later run
rm -rf "$WORK"
mkdir -p "$WORK/track"
T0=$(date +%s)

stages=()
results=()
times=()

# run_stage NAME TIMEOUT COMMAND...: output to WORK/NAME.log (last lines on the console).
run_stage() {
  local name=$1 limit=$2
  shift 2
  local now=$(($(date +%s) - T0))
  if [ "$now" -ge "$BUDGET" ]; then
    stages+=("$name"); results+=("skip (budget ${BUDGET}s spent)"); times+=(0)
    return 1
  fi
  # No stage may run past BUDGET + 100 s (the GPU machine's command limit is 600 s).
  [ "$limit" -gt $((BUDGET + 100 - now)) ] && limit=$((BUDGET + 100 - now))
  echo "=== $name: $*"
  local start
  start=$(date +%s)
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 6 "$WORK/$name.log"
  local result=pass
  [ $rc -ne 0 ] && result="FAIL (rc $rc)"
  [ $rc -eq 124 ] && result="FAIL (timeout ${limit}s)"
  stages+=("$name"); results+=("$result"); times+=("$(($(date +%s) - start))")
  return $rc
}

# summary: the stage table, the exit status, the tar file.
summary() {
  echo
  printf '%-28s %-32s %7s\n' stage result seconds
  failed=0
  for i in "${!stages[@]}"; do
    printf '%-28s %-32s %7s\n' "${stages[$i]}" "${results[$i]}" "${times[$i]}"
    case "${results[$i]}" in pass | skip*) ;; *) failed=1 ;; esac
  done
  echo "total $(($(date +%s) - T0)) s; logs and JSON: $WORK"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar -czf "$OUT/$(basename "$WORK").tar.gz" -C "$BUILD_DIR" "$(basename "$WORK")" &&
      echo "wrote $OUT/$(basename "$WORK").tar.gz"
  fi
  exit $failed
}

# ------------------------------------------------------------------ build
targets=(barrierlm)
[ "$MODE" = check ] && targets=(barrierlm test_gpu)
run_stage configure 300 cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBARRIERLM_CUDA=ON &&
  run_stage build 480 cmake --build "$BUILD_DIR" -j "$(nproc)" --target "${targets[@]}"

# ------------------------------------------------------------------ check: the GPU tests
# The bf16 tests print their measured errors; "[.bench]" times the attention (fp32 flash vs
# bf16 GEMMs, shapes (a) and (b)) and the barrier kernels (B=8 H=12 T=1024 dh=64) alone.
if [ "$MODE" = check ]; then
  if [ -x "$BUILD_DIR/tests/test_gpu" ]; then
    run_stage test-bf16 300 "$BUILD_DIR/tests/test_gpu" "[bf16],[barrier_tc]"
    grep -E "bf16 vs|barrier_tc vs|passed|failed" "$WORK/test-bf16.log" | tail -n 30
    run_stage test-kernels-backend 300 "$BUILD_DIR/tests/test_gpu" "[kernels],[backend]"
    [ "${results[-1]}" = pass ] || run_stage test-sync 300 env BLM_CUDA_SYNC=1 \
      "$BUILD_DIR/tests/test_gpu" "[bf16],[kernels],[backend]"
  else
    stages+=(tests); results+=("FAIL (no test_gpu)"); times+=(0)
  fi
  [ -x "$BUILD_DIR/tests/test_gpu" ] && run_stage kernel-timing 240 "$BUILD_DIR/tests/test_gpu" "[.bench]"
  grep -E "^attention|^barrier" "$WORK/kernel-timing.log" 2>/dev/null
  run_stage bench-smoke 120 "$BIN" bench configs/tiny.yaml --set device.backend=cuda \
    --set model.n_head=1 --steps 3 --warmup 1
  summary
fi
[ -x "$BIN" ] && "$BIN" bench --help >/dev/null 2>&1 && have_bin=1 || have_bin=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$WORK/device.log" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' >>"$WORK/device.log" 2>&1
cat "$WORK/device.log"

# ------------------------------------------------------------------ peak
run_stage peak 120 python3 $PY/bench_torch.py --matmul-peak --out "$WORK/peak.json"
PEAK=$(python3 -c "import json; print(json.load(open('$WORK/peak.json'))['peak_tflops'])" 2>/dev/null || echo 0)

# ------------------------------------------------------------------ cases
# case_args CASE: the config and --set overrides of one case.
case_args() {
  case $1 in
    a-lam0) echo configs/gpt2-small.yaml --set barrier.lambda=0 ;;
    a-lam0.03-K64) echo configs/gpt2-small.yaml --set barrier.lambda=0.03 --set barrier.positions=64 ;;
    b-lam0) echo configs/paper-size.yaml --set barrier.lambda=0 ;;
    b-lam0.03-exact) echo configs/paper-size.yaml --set barrier.lambda=0.03 --set barrier.positions=0 ;;
  esac
}
torch_runs() {
  [ "$1" != a-lam0.03-K64 ] || [ "$TORCH_SAMPLED" = 1 ]
}

for round in $(seq 1 "$ROUNDS"); do
  sfx=""
  [ "$ROUNDS" -gt 1 ] && sfx=".r$round"
  for c in $CASES; do
    if [ "$have_bin" -eq 1 ]; then
      # shellcheck disable=SC2046
      run_stage "$c.blm$sfx" 240 "$BIN" bench $(case_args $c) --set device.backend=cuda \
        --set device.precision="$PRECISION" --steps "$STEPS" --warmup "$WARMUP" \
        --peak-tflops "$PEAK" --out "$WORK/$c.blm$sfx.json"
    else
      stages+=("$c.blm$sfx"); results+=("skip (no barrierlm bench binary)"); times+=(0)
    fi
    if torch_runs $c && [ -f "$WORK/$c.blm$sfx.json" ]; then
      run_stage "$c.torch$sfx" 300 python3 $PY/bench_torch.py --like "$WORK/$c.blm$sfx.json" \
        --steps "$STEPS" --warmup "$TORCH_WARMUP" --out "$WORK/$c.torch$sfx.json" ||
        { grep -q "no GPU\|not a barrierlm" "$WORK/$c.torch$sfx.log" ||
          run_stage "$c.torch-eager$sfx" 300 python3 $PY/bench_torch.py --no-compile \
            --like "$WORK/$c.blm$sfx.json" --steps "$STEPS" --warmup "$TORCH_WARMUP" \
            --out "$WORK/$c.torch$sfx.json"; }
    fi
  done
done

# ------------------------------------------------------------------ bf16 vs fp32 training
# Text: the Brown corpus when present (scripts/get-data.sh; carry data/corpus), else the
# repository's own text files.
if [ "$TRACK_STEPS" -gt 0 ] && [ "$have_bin" -eq 1 ]; then
  if [ -f data/corpus/brown/train.txt ] && [ -f data/corpus/brown/val.txt ]; then
    train_txt=data/corpus/brown/train.txt
    val_txt=data/corpus/brown/val.txt
  else
    echo "bench.sh: data/corpus/brown/{train,val}.txt not found: the bf16 tracking trains on the" \
      "repository's own text, and its acceptance line reads n/a (the bound is on Brown: run" \
      "scripts/get-data.sh and carry data/corpus to this machine)"
    find . -path ./.git -prune -o -path './build*' -prune -o \
      \( -name '*.md' -o -name '*.yaml' -o -name '*.h' -o -name '*.cpp' -o -name '*.cu' \) \
      -type f -print0 | sort -z | xargs -0 cat >"$WORK/track/all.txt"
    total=$(wc -c <"$WORK/track/all.txt")
    head -c $((total * 9 / 10)) "$WORK/track/all.txt" >"$WORK/track/train.txt"
    tail -c $((total - total * 9 / 10)) "$WORK/track/all.txt" >"$WORK/track/val.txt"
    train_txt="$WORK/track/train.txt"
    val_txt="$WORK/track/val.txt"
  fi
  echo "tracking data: $train_txt" >"$WORK/track/data.txt"
  # One training run per precision and seed, all at once on the GPU (small runs; their results do
  # not depend on what else runs), each into track/<precision>-s<seed>/metrics.jsonl.
  track_all() {
    local pids=() p seed rc=0
    for seed in $TRACK_SEEDS; do
      for p in bf16 fp32; do
        "$BIN" train configs/paper-size.yaml --quiet \
          --set device.backend=cuda --set device.precision=$p --set train.seed="$seed" \
          --set barrier.lambda="$TRACK_LAMBDA" --set barrier.positions="$TRACK_POSITIONS" \
          --set data.train="$train_txt" --set data.val="$val_txt" \
          --set data.format=text --set train.steps="$TRACK_STEPS" --set train.warmup=50 \
          --set train.eval_interval="$TRACK_STEPS" --set train.checkpoint_interval=0 \
          --set train.out_dir="$WORK/track-runs" --set train.run_name="$p-s$seed" \
          >"$WORK/track/$p-s$seed.log" 2>&1 &
        pids+=($!)
      done
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    for seed in $TRACK_SEEDS; do
      for p in bf16 fp32; do
        [ -f "$WORK/track-runs/$p-s$seed/metrics.jsonl" ] && mkdir -p "$WORK/track/$p-s$seed" &&
          cp "$WORK/track-runs/$p-s$seed/metrics.jsonl" "$WORK/track/$p-s$seed/metrics.jsonl"
      done
    done
    return $rc
  }
  # (timeout runs a program: the function goes to a child bash with what it reads)
  export -f track_all
  export BIN WORK TRACK_SEEDS TRACK_LAMBDA TRACK_POSITIONS TRACK_STEPS train_txt val_txt
  run_stage track 420 bash -c track_all  # three seeds x two precisions: 295 s at 2ee87af
  rm -rf "$WORK/track-runs" "$WORK/track/all.txt" "$WORK/track/train.txt" "$WORK/track/val.txt"
fi

# ------------------------------------------------------------------ opt-in variants
# barrierlm alone, the lambda 0 cases again under environment settings other than the default
# (each undoes one default, or tries an opt-in), in the same run as the rows above so the step times compare;
# after the tracking, an acceptance line, so that the budget cuts these first: VARIANTS is a list of
# NAME:VAR=V[,VAR=V...]; empty: none.  Printed as a table after the report.
VARIANTS=${VARIANTS-"eager:BLM_CUDA_GRAPHS=0 nopdl:BLM_PDL=0 flash:BLM_ATTENTION=flash keep-gelu:BLM_RECOMPUTE=none nores:BLM_RESIDUAL_LN=0 epi-bias:BLM_LT_EPILOGUES=bias epi-none:BLM_LT_EPILOGUES=none ce-vector:BLM_CE=vector"}
# BARRIER_VARIANTS: likewise for the lambda > 0 cases (the barrier's own choices).
BARRIER_VARIANTS=${BARRIER_VARIANTS-"bwd-tf32:BLM_BARRIER_BWD=mma"}
# run_variants LIST lam0|barrier: each NAME:VAR=V[,VAR=V...] of LIST on the lambda 0 cases, or
# on the others.
run_variants() {
  local v vname venv c
  for v in $1; do
    vname=${v%%:*}
    venv=${v#*:}
    for c in $CASES; do
      case $c in
        *-lam0) [ "$2" = lam0 ] || continue ;;
        *) [ "$2" = barrier ] || continue ;;
      esac
      # shellcheck disable=SC2046,SC2086  # the case's arguments and the variables are words
      run_stage "$c+$vname.var" 120 env ${venv//,/ } "$BIN" bench $(case_args $c) \
        --set device.backend=cuda --set device.precision="$PRECISION" --steps "$STEPS" \
        --warmup "$WARMUP" --peak-tflops "$PEAK" --out "$WORK/$c+$vname.var.json"
    done
  done
}
if [ "$have_bin" -eq 1 ]; then
  run_variants "$VARIANTS" lam0
  run_variants "$BARRIER_VARIANTS" barrier
fi
# POSITIONS_SWEEP: the (a) lambda 0.03 case again with other numbers of sampled positions per
# sequence (barrierlm alone), so that what the estimator costs against K is measured in the same
# run as the lambda 0 step it is compared with; empty: none.
POSITIONS_SWEEP=${POSITIONS_SWEEP-"8 16 32"}
if [ "$have_bin" -eq 1 ] && [[ " $CASES " == *" a-lam0.03-K64 "* ]]; then
  for k in $POSITIONS_SWEEP; do
    # shellcheck disable=SC2046  # the case's arguments are words
    run_stage "a-lam0.03-K$k.pos" 120 "$BIN" bench $(case_args a-lam0.03-K64) \
      --set barrier.positions="$k" --set device.backend=cuda --set device.precision="$PRECISION" \
      --steps "$STEPS" --warmup "$WARMUP" --peak-tflops "$PEAK" --out "$WORK/a-lam0.03-K$k.pos.json"
  done
fi

# ------------------------------------------------------------------ report
echo
echo "=== bench ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(scripts/commit-id.sh), $(head -1 "$WORK/device.log"))"
python3 $PY/bench_report.py "$WORK" --out "$WORK/summary.json" | tee "$WORK/report.log"
# The variants beside their baseline rows (step ms, peak GiB), the position sweep beside (a)
# lambda 0.
if compgen -G "$WORK/*.var.json" >/dev/null || compgen -G "$WORK/*.pos.json" >/dev/null; then
  echo
  python3 - "$WORK" <<'PYEOF' | tee -a "$WORK/report.log"
import glob, json, os, sys
work = sys.argv[1]
variants = sorted(glob.glob(os.path.join(work, "*.var.json")))
if variants:
    print(f"{'variant':32} {'step ms':>8} {'vs default':>10} {'peak GiB':>9}")
for path in variants:
    name = os.path.basename(path)[: -len(".var.json")]
    case = name.split("+")[0]
    v = json.load(open(path))
    base_path = os.path.join(work, f"{case}.blm.json")
    base = json.load(open(base_path))["step_ms_median"] if os.path.exists(base_path) else None
    rel = f"{v['step_ms_median'] / base:9.3f}x" if base else "       n/a"
    print(f"{name:32} {v['step_ms_median']:8.2f} {rel:>10} {v['peak_memory_bytes'] / 2**30:9.2f}")
sweep = glob.glob(os.path.join(work, "a-lam0.03-K*.pos.json"))
lam0_path = os.path.join(work, "a-lam0.blm.json")
lam0 = json.load(open(lam0_path))["step_ms_median"] if os.path.exists(lam0_path) else None
runs = [(v["positions"], v) for v in (json.load(open(p)) for p in sweep)]
k64 = os.path.join(work, "a-lam0.03-K64.blm.json")
if os.path.exists(k64):
    runs.append((64, json.load(open(k64))))
if sweep:
    if variants:
        print()
    print(f"{'(a) lambda 0.03, positions':32} {'step ms':>8} {'vs lam0':>10}  (bound 1.25 at K 64)")
    for k, v in sorted(runs, key=lambda r: r[0]):
        rel = f"{v['step_ms_median'] / lam0:9.3f}x" if lam0 else "       n/a"
        print(f"{'K ' + str(k):32} {v['step_ms_median']:8.2f} {rel:>10}")
PYEOF
fi
summary
