#!/usr/bin/env bash
# The data-parallel acceptance check, on a GPU machine with N >= 2 GPUs, from the repository root:
#
#   build        barrierlm (CUDA on) into $BUILD_DIR when needed, and test_gpu when it was built
#                before or NCCL_UNIT=1
#   nccl-unit    test_gpu "[nccl]": N GPU threads average to the one-GPU gradient, bit-identical
#   eq-N         equivalence, fp32: `--gpus N` with the same global batch B (B/N per GPU) gives
#                the 1-GPU losses within 1e-5 relative at every one of 20 steps (max printed);
#                for N = 2 and N = all; exact barrier, then sampled positions with grad_accum 2
#   eq-bf16      the same in bf16 when the backend has it (tolerance 1e-2, reported); and
#                eq-bf16-lam0 at lambda 0 (bf16 qkv, cuDNN attention)
#   torchrun     two processes started torchrun-style (RANK/WORLD_SIZE/LOCAL_RANK,
#                MASTER_ADDR=127.0.0.1) train exactly as `--gpus 2` (max difference printed)
#   kill-gpus    SIGKILL of rank 1 of a `--gpus N` run: the run ends with an error naming rank 1
#   kill-rank    SIGKILL of rank 1 of a torchrun-style pair: rank 0 ends with an error (timed)
#   hang-rank    SIGSTOP of rank 1 of a torchrun-style pair: rank 0 ends within 60 s (timed)
#   scale-K      GPT-2 small (V 50304, T 1024, L 12, H 12, d 768), 8 sequences per GPU, on
#                K = 1, 2, [4] GPUs: tokens/s per GPU after warm-up, and the ratio to 1 GPU
#
# and prints one table.  Every stage reports even after a failure; the whole check stops starting
# new stages after $BUDGET seconds (default 450: it must fit in 8 minutes with a built tree).
# Logs, metrics and the summary go to $OUT/ddp-check.tar.gz (one file) when OUT is set.
#
#   scripts/ddp-check.sh                       # all visible GPUs
#   GPUS=2 OUT=/tmp/out scripts/ddp-check.sh
#
# Environment: BUILD_DIR (build-gpu), GPUS (all visible), BUDGET (450 s), PRECISION of the
# scaling runs (fp32), SCALE_STEPS (30 measured steps after 5 of warm-up), SCALE_B (8 per GPU).
# NCCL_NVLS_ENABLE=0 is exported (NVLink SHARP multicast stays off on these machines).
. "$(dirname "$0")/help.sh"
set -u
cd "$(dirname "$0")/.." || exit 1
. scripts/gpus.sh
require_gpus 2 ddp-check

export NCCL_NVLS_ENABLE=0
BUILD_DIR=${BUILD_DIR:-build-gpu}
BUDGET=${BUDGET:-450}
PRECISION=${PRECISION:-fp32}
SCALE_STEPS=${SCALE_STEPS:-30}
SCALE_B=${SCALE_B:-8}
WARMUP=5
START=$(date +%s)
WORK="$BUILD_DIR/ddp-check"
LOGS="$WORK/logs"
RUNS="$WORK/runs"
BIN="$BUILD_DIR/cmd/barrierlm"
rm -rf "$WORK"
mkdir -p "$LOGS" "$RUNS"

visible=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
GPUS=${GPUS:-$visible}

stages=()
results=()
times=()
notes=()
record() {  # record NAME RESULT SECONDS NOTE
  stages+=("$1")
  results+=("$2")
  times+=("$3")
  notes+=("$4")
  printf '=== %-12s %-22s %5ss  %s\n' "$1" "$2" "$3" "$4"
}
elapsed() { echo $(($(date +%s) - START)); }
over_budget() { [ "$(elapsed)" -ge "$BUDGET" ]; }

# ------------------------------------------------------------------ helpers

# Train-step losses of a metrics file as "step loss" lines.
losses() {
  grep '"kind":"train"' "$1" | sed -E 's/.*"step":([0-9]+),"loss":([^,]+),.*/\1 \2/'
}
# max relative difference of the losses of two runs, and the number of steps compared
compare_runs() {
  awk 'NR == FNR { a[$1] = $2; next }
       ($1 in a) { d = $2 - a[$1]; if (d < 0) d = -d; s = a[$1] < 0 ? -a[$1] : a[$1];
                   r = s > 0 ? d / s : d; if (r > m) m = r; n++ }
       END { printf "%.3e %d\n", m + 0, n + 0 }' <(losses "$1") <(losses "$2")
}
metrics() { echo "$RUNS/$1/metrics.jsonl"; }

# The text the runs read: the Brown corpus when present, else the repository's own text files.
if [ -f data/corpus/brown/train.txt ] && [ -f data/corpus/brown/val.txt ]; then
  TRAIN_TXT=data/corpus/brown/train.txt
  VAL_TXT=data/corpus/brown/val.txt
else
  find . -path ./.git -prune -o -path './build*' -prune -o \
    \( -name '*.md' -o -name '*.yaml' -o -name '*.h' -o -name '*.cpp' -o -name '*.cu' \) -type f -print0 |
    sort -z | xargs -0 cat >"$WORK/all.txt"
  total=$(wc -c <"$WORK/all.txt")
  head -c $((total * 9 / 10)) "$WORK/all.txt" >"$WORK/train.txt"
  tail -c $((total - total * 9 / 10)) "$WORK/all.txt" >"$WORK/val.txt"
  TRAIN_TXT="$WORK/train.txt"
  VAL_TXT="$WORK/val.txt"
fi

# A small model for the equivalence runs (head size 32), 16 sequences per step.
cat >"$WORK/eq.yaml" <<EOF
model: {n_layer: 2, n_head: 2, d_model: 64, seq_len: 64, vocab_size: 256}
barrier: {lambda: 0.03, eps: 1.0e-4, positions: 0}
data: {train: $TRAIN_TXT, val: $VAL_TXT, tokenizer: byte}
train: {batch_size: 16, grad_accum: 1, steps: 20, lr: 3.0e-3, warmup: 2, log_interval: 1,
        eval_interval: 20, eval_batches: 2, checkpoint_interval: 0, seed: 7, out_dir: $RUNS}
device: {backend: cuda, precision: fp32}
EOF

# train NAME LOG ARGS...: one run of the equivalence model, foreground.
train() {
  local name=$1 log=$2
  shift 2
  timeout 300 "$BIN" train "$WORK/eq.yaml" --set train.run_name="$name" "$@" >"$LOGS/$log.log" 2>&1
}

# ------------------------------------------------------------------ build
t0=$(date +%s)
if [ ! -x "$BIN" ] || [ ! -f "$BUILD_DIR/build.ninja" ] ||
   [ -n "$(find cmd core cuda data tests CMakeLists.txt -newer "$BIN" -type f 2>/dev/null | head -1)" ]; then
  # test_gpu (all the GPU tests) only when it was built before or NCCL_UNIT=1: from scratch it
  # can take minutes, and gpu-check.sh runs the same [nccl] cases.
  targets=barrierlm
  { [ -x "$BUILD_DIR/tests/test_gpu" ] || [ "${NCCL_UNIT:-0}" = 1 ]; } && targets="barrierlm test_gpu"
  { cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBARRIERLM_CUDA=ON &&
    cmake --build "$BUILD_DIR" -j "$(nproc)" --target $targets; } >"$LOGS/build.log" 2>&1
  rc=$?
else
  echo "up to date" >"$LOGS/build.log"
  rc=0
fi
if [ $rc -eq 0 ]; then record build pass $(($(date +%s) - t0)) "$(tail -1 "$LOGS/build.log" | cut -c1-60)"
else record build "FAIL (rc $rc)" $(($(date +%s) - t0)) "see logs/build.log"; fi
echo "GPUs: $GPUS of $visible visible; NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"

# ------------------------------------------------------------------ GPU unit tests of NCCL
t0=$(date +%s)
if [ -x "$BUILD_DIR/tests/test_gpu" ]; then
  timeout 300 "$BUILD_DIR/tests/test_gpu" "[nccl]" >"$LOGS/nccl-unit.log" 2>&1
  rc=$?
  note=$(grep -E 'All tests passed|test cases:' "$LOGS/nccl-unit.log" | tail -1)
  [ $rc -eq 0 ] && r=pass || r="FAIL (rc $rc)"
  grep -q "not run" "$LOGS/nccl-unit.log" && r="FAIL (not run: <2 GPUs)"
  record nccl-unit "$r" $(($(date +%s) - t0)) "$note"
else
  record nccl-unit skip 0 "no test_gpu"
fi

# ------------------------------------------------------------------ equivalence
# eq NAME KIND N TOL EXTRA...: 1 GPU vs N GPUs with the same global batch (runs KIND-1gpu and
# KIND-Ngpu); passes when every step's loss agrees within TOL.
eq() {
  local name=$1 kind=$2 n=$3 tol=$4
  shift 4
  if over_budget; then record "$name" skip 0 "time budget"; return; fi
  local t0=$(date +%s) one="$kind-1gpu" many="$kind-${n}gpu" rc1=0 rcn=0
  [ -f "$(metrics "$one")" ] || { train "$one" "$one" --gpus 1 "$@"; rc1=$?; }
  [ $rc1 -eq 0 ] && { train "$many" "$many" --gpus "$n" "$@"; rcn=$?; }
  local took=$(($(date +%s) - t0))
  if [ $rc1 -ne 0 ] || [ $rcn -ne 0 ]; then
    if grep -q "not implemented" "$LOGS/$one.log" 2>/dev/null; then
      record "$name" skip $took "$(grep -o 'precision[^;]*not implemented' "$LOGS/$one.log" | head -1)"
    else
      record "$name" "FAIL (rc $rc1/$rcn)" $took "$(cat "$LOGS/$one.log" "$LOGS/$many.log" 2>/dev/null | grep -m1 error | cut -c1-90)"
    fi
    return
  fi
  read -r maxrel steps < <(compare_runs "$(metrics "$one")" "$(metrics "$many")")
  local r=pass
  awk -v m="$maxrel" -v t="$tol" 'BEGIN { exit !(m <= t) }' || r="FAIL (> $tol)"
  [ "$steps" -eq 20 ] || r="FAIL ($steps steps)"
  local val1 valn
  val1=$(grep '"kind":"eval"' "$(metrics "$one")" | tail -1 | grep -o '"val_ce":[^,]*')
  valn=$(grep '"kind":"eval"' "$(metrics "$many")" | tail -1 | grep -o '"val_ce":[^,]*')
  record "$name" "$r" $took "1 vs $n GPUs: max rel loss diff $maxrel over $steps steps (tol $tol); $val1 / $valn"
}

eq eq-2 exact 2 1e-5
[ "$GPUS" -gt 2 ] && eq "eq-$GPUS" exact "$GPUS" 1e-5
eq eq-sampled-accum sampled "$GPUS" 1e-5 --set barrier.positions=8 --set train.grad_accum=2
eq eq-bf16 bf16 "$GPUS" 1e-2 --set device.precision=bf16
# lambda 0 in bf16: the bf16 qkv and cuDNN's attention (the defaults where no barrier reads qkv)
eq eq-bf16-lam0 bf16-lam0 "$GPUS" 1e-2 --set device.precision=bf16 --set barrier.lambda=0

# ------------------------------------------------------------------ torchrun-style launch
# torchrun_pair NAME EXTRA...: starts ranks 0 and 1 in the background; pids in P0, P1.
torchrun_pair() {
  local name=$1
  shift
  local port=$((20000 + RANDOM % 20000))
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      "$BIN" train "$WORK/eq.yaml" --set train.run_name="$name" "$@" >"$LOGS/$name-rank$r.log" 2>&1 &
    eval "P$r=$!"
  done
}

if over_budget; then record torchrun skip 0 "time budget"; else
  t0=$(date +%s)
  [ -f "$(metrics exact-2gpu)" ] || train exact-2gpu exact-2gpu --gpus 2
  torchrun_pair torchrun
  wait "$P0"; rc0=$?
  wait "$P1"; rc1=$?
  took=$(($(date +%s) - t0))
  if [ $rc0 -eq 0 ] && [ $rc1 -eq 0 ] && [ -f "$(metrics torchrun)" ]; then
    read -r maxrel steps < <(compare_runs "$(metrics exact-2gpu)" "$(metrics torchrun)")
    r=pass
    awk -v m="$maxrel" 'BEGIN { exit !(m <= 1e-6) }' || r="FAIL (differs)"
    record torchrun "$r" $took "vs --gpus 2: max rel loss diff $maxrel over $steps steps"
  else
    record torchrun "FAIL (rc $rc0/$rc1)" $took "$(grep -h error "$LOGS"/torchrun-rank*.log | head -1 | cut -c1-90)"
  fi
fi

# ------------------------------------------------------------------ failures
# wait_steps METRICS N [PID]: waits (at most 120 s) until a run has logged step N; fails at once
# when PID (the run) has ended first, instead of waiting out the 120 s.
wait_steps() {
  local i
  for i in $(seq 1200); do
    if [ -f "$1" ] && [ "$(grep -c '"kind":"train"' "$1")" -ge "$2" ]; then return 0; fi
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
    sleep 0.1
  done
  return 1
}
# wait_exit PID LIMIT: waits for a background pid of this shell at most LIMIT seconds; sets rc
# (its status, or "hung") and secs (seconds waited).  Not in a subshell: `wait` needs this one.
wait_exit() {
  local pid=$1 limit=$2 t0 i
  t0=$(date +%s.%N)
  for i in $(seq $((limit * 10))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    rc=hung
  else
    wait "$pid"
    rc=$?
  fi
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
}
LONG=(--set train.steps=100000 --set train.eval_interval=0)

if over_budget; then record kill-gpus skip 0 "time budget"; else
  t0=$(date +%s)
  "$BIN" train "$WORK/eq.yaml" --set train.run_name=kill-gpus --gpus "$GPUS" "${LONG[@]}" \
    >"$LOGS/kill-gpus.log" 2>&1 &
  parent=$!
  if wait_steps "$(metrics kill-gpus)" 3 "$parent"; then
    rank1=""
    for c in $(ps -o pid= --ppid "$parent"); do
      tr '\0' '\n' <"/proc/$c/environ" 2>/dev/null | grep -qx 'RANK=1' && rank1=$c
    done
    kill -9 "$rank1"
    wait_exit "$parent" 90
    r=pass
    [ "$rc" = 1 ] || r="FAIL (rc $rc)"
    grep -q "rank 1 (pid $rank1) was killed by signal 9" "$LOGS/kill-gpus.log" || r="FAIL (message)"
    awk -v s="$secs" 'BEGIN { exit !(s < 60) }' || r="FAIL (slow)"
    record kill-gpus "$r" $(($(date +%s) - t0)) "ended ${secs}s after SIGKILL of rank 1: $(grep -m1 'rank 1' "$LOGS/kill-gpus.log" | cut -c1-70)"
  else
    kill -9 "$parent" 2>/dev/null
    record kill-gpus "FAIL (no progress)" $(($(date +%s) - t0)) "$(grep -m1 error "$LOGS/kill-gpus.log" | cut -c1-90)"
  fi
fi

# failure_pair NAME SIGNAL EXPECT: a torchrun-style pair, SIGNAL to rank 1 after step 3; rank 0
# must end with status 1 and a message matching EXPECT within 60 s.
failure_pair() {
  local name=$1 sig=$2 expect=$3 t0
  if over_budget; then record "$name" skip 0 "time budget"; return; fi
  t0=$(date +%s)
  torchrun_pair "$name" "${LONG[@]}"
  if wait_steps "$(metrics "$name")" 3 "$P0"; then
    kill "-$sig" "$P1"
    wait_exit "$P0" 90
    kill -9 "$P1" 2>/dev/null
    wait "$P1" 2>/dev/null
    local r=pass
    [ "$rc" = 1 ] || r="FAIL (rc $rc)"
    grep -Eq "$expect" "$LOGS/$name-rank0.log" || r="FAIL (message)"
    awk -v s="$secs" 'BEGIN { exit !(s < 60) }' || r="FAIL (slow)"
    record "$name" "$r" $(($(date +%s) - t0)) "rank 0 ended ${secs}s after SIG$sig of rank 1: $(grep -m1 'error' "$LOGS/$name-rank0.log" | cut -c19-100)"
  else
    kill -9 "$P0" "$P1" 2>/dev/null
    record "$name" "FAIL (no progress)" $(($(date +%s) - t0)) "$(grep -hm1 error "$LOGS/$name"-rank*.log | cut -c1-90)"
  fi
}
failure_pair kill-rank KILL "rank 1 .*exited unexpectedly"
failure_pair hang-rank STOP "rank 1.*stopped responding"

# ------------------------------------------------------------------ scaling, GPT-2 small
scale() {
  local k=$1
  if over_budget; then record "scale-$k" skip 0 "time budget"; return; fi
  local t0=$(date +%s) name="scale-$k"
  timeout 400 "$BIN" train configs/gpt2-small.yaml --gpus "$k" \
    --set data.train="$TRAIN_TXT" --set data.val="$VAL_TXT" --set data.format=text \
    --set data.tokenizer=byte --set device.precision="$PRECISION" \
    --set train.batch_size=$((SCALE_B * k)) --set train.grad_accum=1 \
    --set train.steps=$((WARMUP + SCALE_STEPS)) --set train.log_interval=$WARMUP \
    --set train.eval_interval=0 --set train.checkpoint_interval=0 \
    --set train.out_dir="$RUNS" --set train.run_name="$name" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t0))
  if [ $rc -ne 0 ]; then
    record "$name" "FAIL (rc $rc)" $took "$(grep -m1 error "$LOGS/$name.log" | cut -c1-90)"
    return
  fi
  # Intervals after warm-up: the overall rate is (intervals) / sum(1 / rate), per GPU / k.
  local rate
  rate=$(grep '"kind":"train"' "$(metrics "$name")" |
    sed -E 's/.*"step":([0-9]+),.*"tokens_per_s":([^,]+),.*/\1 \2/' |
    awk -v w=$WARMUP -v k="$k" '$1 > w && $1 % w == 0 { n++; inv += 1 / $2 }
                                 END { if (n) printf "%.0f", n / inv / k; else print 0 }')
  eval "RATE_$k=$rate"
  local ratio=""
  if [ "$k" != 1 ] && [ -n "${RATE_1:-}" ] && [ "${RATE_1:-0}" != 0 ]; then
    ratio=$(awk -v a="$rate" -v b="$RATE_1" 'BEGIN { printf "%.1f%%", 100 * a / b }')
    awk -v a="$rate" -v b="$RATE_1" 'BEGIN { exit !(a >= 0.9 * b) }' || {
      record "$name" "FAIL (< 90%)" $took "$rate tokens/s per GPU ($ratio of 1 GPU)"
      return
    }
  fi
  record "$name" pass $took "$rate tokens/s per GPU${ratio:+ ($ratio of 1 GPU)}, $PRECISION, B $SCALE_B/GPU"
}
scale 1
scale 2
[ "$GPUS" -ge 4 ] && scale 4

# ------------------------------------------------------------------ summary
{
  echo
  echo "=== ddp-check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(scripts/commit-id.sh), $GPUS GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(elapsed) s)"
  printf '%-18s %-24s %7s  %s\n' stage result seconds note
  for i in "${!stages[@]}"; do
    printf '%-18s %-24s %7s  %s\n' "${stages[$i]}" "${results[$i]}" "${times[$i]}" "${notes[$i]}"
  done
} | tee "$LOGS/summary.txt"
failed=0
for r in "${results[@]}"; do case "$r" in pass | skip*) ;; *) failed=1 ;; esac; done
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  find "$RUNS" -name metrics.jsonl -o -name config.yaml | tar -czf "$OUT/ddp-check.tar.gz" \
    -C . "$LOGS" -T - 2>/dev/null
  echo "logs and metrics: $OUT/ddp-check.tar.gz"
fi
exit $failed
