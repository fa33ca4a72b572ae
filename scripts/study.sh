#!/usr/bin/env bash
# The barrier study (issue 7): does the barrier buy robustness to embedding noise?
#
# Trains the configs of configs/paper/ (lambda = 0, 0.01, 0.03, 0.1) with seeds 1 and 2, the same
# steps and data order, then for every model `barrierlm eval` at noise sigma in
# {0, 0.05, 0.1, 0.2, 0.4} (several draws) and `barrierlm margins`, then `barrierlm report`, which
# writes docs/RESULTS.md and its plots (docs/results/).
#
#   scripts/study.sh                       # on the GPU machine (STUDY_SIZE=paper)
#   STUDY_SIZE=tiny scripts/study.sh       # the CPU-sized pipeline (tiny model, seconds per run)
#
# Idempotent: a finished run is skipped, an interrupted one resumes from its checkpoint, an
# evaluation is redone only when its checkpoint is newer (or the noise settings changed).  So a
# call cut short by the time limit is continued by calling the script again.
#
# Time budget (paper): training stops (Ctrl-C semantics: checkpoint saved) DEADLINE_S seconds
# after the start minus POST_S reserved for evaluation and the report; unfinished runs resume on
# the next call.  STEPS=auto (the default) times 30 steps of the most expensive model, run
# PARALLEL-fold at once as the study will, and picks the largest step count (a multiple of 50)
# whose training fits the budget; the number is stored in STUDY_DIR/steps and reused by later
# calls, so every run of the study trains the same number of steps.
#
# Environment (defaults: paper / tiny):
#   STUDY_SIZE     paper | tiny
#   LAMBDAS        "0 0.01 0.03 0.1" / "0 0.1"     barrier weights; 0 is the baseline
#   SEEDS          "1 2"                           train.seed values
#   STEPS          auto / 40                       optimizer steps of every run
#   SIGMAS         0,0.05,0.1,0.2,0.4              eval noise levels
#   DRAWS          5 / 2                           noise draws per level
#   EVAL_BATCHES   20 / 4                          batches of the final noise evaluation
#   VAL_BATCHES    8 / 4                           batches of each validation during training
#   MARGIN_SEQS    8 / 4                           validation sequences for the margins
#   TAU            0.25                            margin threshold ("near the boundary")
#   COMPARE_SIGMA  0.1                             the level compared with the paper's -12%
#   STUDY_DIR      runs/study-paper / runs/study-tiny   run directories
#   RESULTS        docs/RESULTS.md / STUDY_DIR/RESULTS.md   the markdown report
#   PLOTS_DIR      docs/results / STUDY_DIR/report      report.json and the SVG plots
#   PARALLEL       GPUs x PER_GPU / 2              training processes at once
#   PER_GPU        4                               processes sharing one GPU (paper)
#   DEADLINE_S     540 / 0 (none)                  wall-clock budget of this call, seconds
#   POST_S         100                             of which kept for eval, margins and report
#   BIN            (built here)                    the barrierlm binary to use
#   BUILD_DIR      build-gpu / build               where to build it when BIN is not given
#   STUDY_DATA     (Brown corpus)                  tiny only: train on this text instead (10%
#                                                  held out for validation)
# Exit status: 0 study complete and reported; 3 incomplete (time ran out: call again); other
# non-zero: an error (printed).
. "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

STUDY_SIZE=${STUDY_SIZE:-paper}
case "$STUDY_SIZE" in
  paper)
    : "${LAMBDAS:=0 0.01 0.03 0.1}" "${STEPS:=auto}" "${DRAWS:=5}" "${STUDY_DIR:=runs/study-paper}"
    : "${RESULTS:=docs/RESULTS.md}" "${PLOTS_DIR:=docs/results}" "${DEADLINE_S:=540}"
    : "${BUILD_DIR:=build-gpu}" "${PER_GPU:=4}" "${MARGIN_SEQS:=8}" "${EVAL_BATCHES:=20}"
    : "${VAL_BATCHES:=8}"
    ;;
  tiny)
    : "${LAMBDAS:=0 0.1}" "${STEPS:=40}" "${DRAWS:=2}" "${STUDY_DIR:=runs/study-tiny}"
    : "${RESULTS:=$STUDY_DIR/RESULTS.md}" "${PLOTS_DIR:=$STUDY_DIR/report}" "${DEADLINE_S:=0}"
    : "${BUILD_DIR:=build}" "${PARALLEL:=2}" "${MARGIN_SEQS:=4}" "${EVAL_BATCHES:=4}"
    : "${VAL_BATCHES:=4}"
    ;;
  *)
    echo "study.sh: STUDY_SIZE must be 'paper' or 'tiny', got '$STUDY_SIZE'" >&2
    exit 2
    ;;
esac
: "${SEEDS:=1 2}" "${SIGMAS:=0,0.05,0.1,0.2,0.4}" "${COMPARE_SIGMA:=0.1}" "${POST_S:=100}"
: "${TAU:=0.25}" "${STUDY_DATA:=}"
export NCCL_NVLS_ENABLE=0  # NVLink SHARP multicast stays off on the shared machines

started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }
say() { printf '[study %4ss] %s\n' "$(elapsed)" "$*"; }
die() { echo "study.sh: error: $*" >&2; exit 1; }

# ------------------------------------------------------------------ the program

. scripts/gpus.sh
NGPU=$(visible_gpus)
# Before any build: the paper's size needs a GPU.
[ "$STUDY_SIZE" = paper ] && [ "$NGPU" -eq 0 ] &&
  die "STUDY_SIZE=paper needs a GPU (none visible); STUDY_SIZE=tiny runs on the CPU"

if [ -z "${BIN:-}" ]; then
  cuda=OFF
  [ "$NGPU" -gt 0 ] && cuda=ON
  say "building barrierlm in $BUILD_DIR (CUDA $cuda)"
  generator=()
  command -v ninja >/dev/null && [ ! -f "$BUILD_DIR/Makefile" ] && generator=(-G Ninja)
  cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBARRIERLM_CUDA=$cuda >/dev/null
  cmake --build "$BUILD_DIR" -j "$(nproc)" --target barrierlm >/dev/null
  BIN="$BUILD_DIR/cmd/barrierlm"
fi
[ -x "$BIN" ] || die "the barrierlm binary '$BIN' does not exist or is not executable"

# ------------------------------------------------------------------ data and settings

data_args=()
if [ "$STUDY_SIZE" = paper ]; then
  [ "$NGPU" -gt 0 ] || die "STUDY_SIZE=paper needs a GPU (none visible); STUDY_SIZE=tiny runs on the CPU"
  : "${PARALLEL:=$((NGPU * PER_GPU))}"
  backend=cuda
else
  : "${PARALLEL:=2}"
  backend=cpu
  NGPU=0
fi
if [ -n "$STUDY_DATA" ]; then
  [ "$STUDY_SIZE" = tiny ] || die "STUDY_DATA is for STUDY_SIZE=tiny (the paper study uses the Brown corpus)"
  [ -f "$STUDY_DATA" ] || die "STUDY_DATA file '$STUDY_DATA' does not exist"
  data_args=(--set "data.train=$STUDY_DATA" --set "data.val=")
elif [ ! -f data/corpus/brown/train.txt ] || [ ! -f data/corpus/brown/val.txt ]; then
  say "fetching the Brown corpus (scripts/get-data.sh)"
  scripts/get-data.sh || die "no data/corpus/brown/{train,val}.txt and scripts/get-data.sh failed (offline? copy data/corpus/ here)"
fi
[ "$PARALLEL" -ge 1 ] || die "PARALLEL must be at least 1"
mkdir -p "$STUDY_DIR"
threads_per_job=$(( $(nproc) / PARALLEL ))
[ "$threads_per_job" -ge 1 ] || threads_per_job=1

config_for() {  # config file of a lambda
  if [ "$STUDY_SIZE" = tiny ]; then echo configs/paper/tiny.yaml
  elif [ "$1" = 0 ]; then echo configs/paper/baseline.yaml
  elif [ -f "configs/paper/lambda-$1.yaml" ]; then echo "configs/paper/lambda-$1.yaml"
  else echo configs/paper/baseline.yaml  # other lambdas: the baseline with barrier.lambda set
  fi
}
run_name() { echo "lam$1-seed$2"; }

runs=()
for seed in $SEEDS; do
  for lam in $LAMBDAS; do runs+=("$lam:$seed"); done
done
[ ${#runs[@]} -gt 0 ] || die "no runs: LAMBDAS and SEEDS must not be empty"

# ------------------------------------------------------------------ steps

# Seconds per step of the most expensive model (largest lambda) with PARALLEL copies at once,
# timed between steps 10 and 30.
calibrate() {
  local lam=0 cal="$STUDY_DIR/.calibration" pids=() i
  for l in $LAMBDAS; do awk -v a="$l" -v b="$lam" 'BEGIN { exit !(a > b) }' && lam=$l; done
  rm -rf "$cal"
  for ((i = 0; i < PARALLEL; i++)); do
    CUDA_VISIBLE_DEVICES=$(lane_gpu "$i") "$BIN" train "$(config_for "$lam")" --quiet \
      --set "barrier.lambda=$lam" --set train.steps=30 --set train.warmup=5 \
      --set train.eval_interval=0 --set train.log_interval=10 --set train.checkpoint_interval=0 \
      --set "device.backend=$backend" --set "device.threads=$threads_per_job" \
      --set "train.out_dir=$cal" --set "train.run_name=c$i" "${data_args[@]}" \
      >"$cal.c$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { cat "$cal".c*.log >&2; die "calibration run failed"; }; done
  local worst=0 t10 t30 s
  for ((i = 0; i < PARALLEL; i++)); do
    t10=$(grep '"kind":"train","step":10,' "$cal/c$i/metrics.jsonl" | sed -E 's/.*"elapsed":([^,}]*).*/\1/')
    t30=$(grep '"kind":"train","step":30,' "$cal/c$i/metrics.jsonl" | sed -E 's/.*"elapsed":([^,}]*).*/\1/')
    s=$(awk -v a="$t10" -v b="$t30" 'BEGIN { printf "%.6f", (b - a) / 20 }')
    worst=$(awk -v a="$s" -v b="$worst" 'BEGIN { print (a > b) ? a : b }')
  done
  rm -rf "$cal" "$cal".c*.log
  echo "$worst"
}

lane_gpu() { if [ "$NGPU" -gt 0 ]; then echo $(($1 % NGPU)); else echo ""; fi; }

steps_file="$STUDY_DIR/steps"
if [ -f "$steps_file" ]; then
  stored=$(cat "$steps_file")
  if [ "$STEPS" != auto ] && [ "$STEPS" != "$stored" ]; then
    die "$STUDY_DIR was started with STEPS=$stored; use that, or another STUDY_DIR for STEPS=$STEPS"
  fi
  STEPS=$stored
elif [ "$STEPS" = auto ]; then
  [ "$DEADLINE_S" -gt 0 ] || die "STEPS=auto needs a time budget (DEADLINE_S > 0)"
  say "timing 30 steps of the largest-lambda model, $PARALLEL at once"
  per_step=$(calibrate)
  waves=$(( (${#runs[@]} + PARALLEL - 1) / PARALLEL ))
  budget=$(( DEADLINE_S - POST_S - $(elapsed) ))
  # 70% of the budget: the validation passes during training (8 of VAL_BATCHES batches and a
  # margin probe) and each process's start cost time too.
  STEPS=$(awk -v b="$budget" -v w="$waves" -v s="$per_step" \
    'BEGIN { n = int(0.7 * b / (w * s) / 50) * 50; if (n < 100) n = 100; if (n > 5000) n = 5000; print n }')
  how="STEPS=$STEPS was sized to the time budget: ${per_step}s per step of the lambda-max model with $PARALLEL processes at once, ${#runs[@]} runs in $waves waves, $budget s for training"
  echo "$how" >"$STUDY_DIR/steps.how"
  say "calibration: $how"
fi
[[ "$STEPS" =~ ^[0-9]+$ ]] && [ "$STEPS" -gt 0 ] || die "STEPS must be a positive integer or auto, got '$STEPS'"
echo "$STEPS" >"$steps_file"
warmup=$(( STEPS / 10 < 200 ? STEPS / 10 : 200 ))
[ "$warmup" -ge 1 ] || warmup=1
eval_interval=$(( STEPS / 8 > 0 ? STEPS / 8 : 1 ))
ckpt_interval=$(( STEPS / 5 > 0 ? STEPS / 5 : 1 ))

# ------------------------------------------------------------------ training

is_trained() { grep -q "\"kind\":\"train\",\"step\":$STEPS," "$STUDY_DIR/$1/metrics.jsonl" 2>/dev/null; }
last_step() {
  local s
  s=$(grep '"kind":"train"' "$STUDY_DIR/$1/metrics.jsonl" 2>/dev/null | tail -n1 | sed -E 's/.*"step":([0-9]+).*/\1/')
  echo "${s:-0}"
}

train_one() {  # lam seed lane
  local lam=$1 seed=$2 lane=$3 name limit rc resume=()
  name=$(run_name "$lam" "$seed")
  if is_trained "$name"; then say "train $name: done already"; return 0; fi
  [ -f "$STUDY_DIR/$name/checkpoint.bin" ] && resume=(--resume "$STUDY_DIR/$name")
  limit=0
  if [ "$DEADLINE_S" -gt 0 ]; then
    limit=$(( DEADLINE_S - POST_S - $(elapsed) ))
    if [ "$limit" -le 5 ]; then say "train $name: no time left in this call"; return 0; fi
  fi
  say "train $name${resume:+ (resuming at step $(last_step "$name"))} on ${backend}$( [ "$NGPU" -gt 0 ] && echo " GPU $(lane_gpu "$lane")")"
  set +e
  # SIGINT at the deadline: barrierlm finishes the step, saves the checkpoint and exits 130.
  CUDA_VISIBLE_DEVICES=$(lane_gpu "$lane") timeout -s INT -k 60 "$limit" \
    "$BIN" train "$(config_for "$lam")" --quiet "${resume[@]}" \
    --set "barrier.lambda=$lam" --set "train.seed=$seed" --set "train.steps=$STEPS" \
    --set "train.warmup=$warmup" --set "train.eval_interval=$eval_interval" \
    --set "train.eval_batches=$VAL_BATCHES" \
    --set "train.checkpoint_interval=$ckpt_interval" --set "device.backend=$backend" \
    --set "device.threads=$threads_per_job" --set "train.out_dir=$STUDY_DIR" \
    --set "train.run_name=$name" "${data_args[@]}" >"$STUDY_DIR/$name.train.log" 2>&1
  rc=$?
  set -e
  case $rc in
    0) say "train $name: finished ($(tail -n1 "$STUDY_DIR/$name.train.log" | cut -c1-100))" ;;
    130 | 124) say "train $name: stopped by the time limit at step $(last_step "$name") (checkpoint saved; call again to continue)" ;;
    *) say "train $name: FAILED (exit $rc): $(tail -n1 "$STUDY_DIR/$name.train.log")"; return 1 ;;
  esac
}

progress_monitor() {  # each run's step every 30 s, until the flag file goes
  local ticks=0 line r
  while [ -e "$1" ]; do
    sleep 1
    ticks=$((ticks + 1))
    [ $((ticks % 30)) -eq 0 ] && [ -e "$1" ] || continue
    line=""
    for r in "${runs[@]}"; do
      line+=" $(run_name "${r%%:*}" "${r##*:}")=$(last_step "$(run_name "${r%%:*}" "${r##*:}")")"
    done
    say "progress (of $STEPS):$line"
  done
}

say "study: ${#runs[@]} runs (lambda: $LAMBDAS; seeds: $SEEDS), $STEPS steps each, $PARALLEL at once, in $STUDY_DIR"
lane_pids=()
for ((lane = 0; lane < PARALLEL; lane++)); do
  (
    for ((k = lane; k < ${#runs[@]}; k += PARALLEL)); do
      r=${runs[$k]}
      train_one "${r%%:*}" "${r##*:}" "$lane" || exit 1
    done
  ) &
  lane_pids+=($!)
done
monitor_flag="$STUDY_DIR/.training"
touch "$monitor_flag"
progress_monitor "$monitor_flag" &
monitor=$!
train_failed=0
for p in "${lane_pids[@]}"; do wait "$p" || train_failed=1; done
rm -f "$monitor_flag"
wait "$monitor" 2>/dev/null || true
[ $train_failed -eq 0 ] || die "a training run failed (logs: $STUDY_DIR/*.train.log)"

# ------------------------------------------------------------------ eval and margins

eval_stamp() { echo "sigmas=$SIGMAS draws=$DRAWS batches=$EVAL_BATCHES tau=$TAU sequences=$MARGIN_SEQS"; }

evaluate_one() {  # lam seed lane
  local name dir gpu
  name=$(run_name "$1" "$2")
  dir="$STUDY_DIR/$name"
  if [ -f "$dir/eval.json" ] && [ "$dir/eval.json" -nt "$dir/checkpoint.bin" ] &&
     [ -f "$dir/margins/margins.json" ] && [ "$(cat "$dir/.study-eval" 2>/dev/null)" = "$(eval_stamp)" ]; then
    say "eval $name: done already"
    return 0
  fi
  gpu=$(lane_gpu "$3")
  say "eval $name: noise $SIGMAS x $DRAWS draws; margins"
  CUDA_VISIBLE_DEVICES=$gpu "$BIN" eval "$dir" --noise "$SIGMAS" --draws "$DRAWS" --seed 1234 \
    --batches "$EVAL_BATCHES" \
    --backend "$backend" --threads "$threads_per_job" --out "$dir/eval.json" >"$dir.eval.log" 2>&1 ||
    { say "eval $name: FAILED: $(tail -n1 "$dir.eval.log")"; return 1; }
  CUDA_VISIBLE_DEVICES=$gpu "$BIN" margins "$dir" --sequences "$MARGIN_SEQS" --tau "$TAU" \
    --backend "$backend" --threads "$threads_per_job" --out "$dir/margins" >"$dir.margins.log" 2>&1 ||
    { say "margins $name: FAILED: $(tail -n1 "$dir.margins.log")"; return 1; }
  eval_stamp >"$dir/.study-eval"
}

finished=()
for r in "${runs[@]}"; do
  name=$(run_name "${r%%:*}" "${r##*:}")
  is_trained "$name" && finished+=("$r")
done
lane_pids=()
for ((lane = 0; lane < PARALLEL; lane++)); do
  (
    for ((k = lane; k < ${#finished[@]}; k += PARALLEL)); do
      r=${finished[$k]}
      evaluate_one "${r%%:*}" "${r##*:}" "$lane" || exit 1
    done
  ) &
  lane_pids+=($!)
done
eval_failed=0
for p in "${lane_pids[@]}"; do wait "$p" || eval_failed=1; done
[ $eval_failed -eq 0 ] || die "an evaluation failed (logs: $STUDY_DIR/*.eval.log, *.margins.log)"

# ------------------------------------------------------------------ report

[ ${#finished[@]} -gt 0 ] || { say "no run has finished yet: call again to continue"; exit 3; }
dirs=()
for r in "${finished[@]}"; do dirs+=("$STUDY_DIR/$(run_name "${r%%:*}" "${r##*:}")"); done
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
device=$(if [ "$NGPU" -gt 0 ]; then nvidia-smi --query-gpu=name --format=csv,noheader | head -n1; else echo "CPU ($(nproc) cores)"; fi)
note="Made by \`STUDY_SIZE=$STUDY_SIZE scripts/study.sh\` (commit $commit) on $device, $(date -u +%Y-%m-%d): \
${#runs[@]} runs (lambda $LAMBDAS x seeds $SEEDS), $STEPS steps each, $PARALLEL training processes at once; \
eval at noise $SIGMAS with $DRAWS draws per level; margins of $MARGIN_SEQS validation sequences."
[ -f "$STUDY_DIR/steps.how" ] && note="$note $(cat "$STUDY_DIR/steps.how")."
if [ ${#finished[@]} -lt ${#runs[@]} ]; then
  note="$note

**INCOMPLETE: ${#finished[@]} of ${#runs[@]} runs have finished training; this report covers only those. Call scripts/study.sh again to finish the rest.**"
fi
say "report: $RESULTS, $PLOTS_DIR/"
"$BIN" report "${dirs[@]}" --out "$PLOTS_DIR" --markdown "$RESULTS" --compare-sigma "$COMPARE_SIGMA" \
  --tau "$TAU" --note "$note"
if [ ${#finished[@]} -lt ${#runs[@]} ]; then
  say "incomplete: ${#finished[@]} of ${#runs[@]} runs finished; call scripts/study.sh again to continue"
  exit 3
fi
say "study complete in $(elapsed)s: $RESULTS"
