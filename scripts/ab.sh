#!/usr/bin/env bash
# Two source trees side by side on one GPU machine: build both, run the GPU tests of the second,
# time kernel benches on both, and alternate training-step benches between them.  The way a
# kernel change is measured here (docs/PERFORMANCE.md, "A change against its parent"), in one
# command that keeps every log and prints a short table.
#
#   scripts/ab.sh OLD_DIR NEW_DIR
#   OUT=/some/dir TESTS="[barrier-linalg]" BENCH_TAGS="[.bench][barrier-linalg]" scripts/ab.sh \
#       .snap-old .
#
# OLD_DIR, NEW_DIR: source trees (an export of a commit, e.g. `git archive REV | tar -x -C
# .snap-old`, or the repository root; git ignores .snap*, so a copy of the working tree made
# for another machine must be told to take them along).  Each is built in $BUILDS/build-old,
# $BUILDS/build-new (CUDA on, sm_90a, Release); the same tree twice is built once, for
# comparing two settings of one build (OLD_ENV, NEW_ENV).  Environment:
#   OUT         where logs go (default: a new temporary folder)
#   BUILDS      where the two builds go (default: $OUT; on the GPU machine put them outside the
#               folder whose files come back, e.g. BUILDS=/tmp/ab)
#   OLD_ENV, NEW_ENV
#               VAR=value words set for that side's tests and benches only (e.g.
#               NEW_ENV="BLM_BARRIER_BWD=mma" with OLD_DIR = NEW_DIR: two kernels of one build)
#   TESTS       test_gpu filter run on NEW (default: the barrier and wgmma tags; "" skips)
#   BENCH_TAGS  test_gpu "[.bench]" cases run on both, in turn; their lines matching
#               BENCH_GREP are printed (default: none)
#   BENCH_GREP  regex for the bench lines to print (default: "ms")
#   CASES       step benches, ";"-separated `barrierlm bench` argument lists (default: the
#               paper's size exact and GPT-2 small K 64, lambda 0.03); "" skips
#   ROUNDS      how many times each case alternates OLD, NEW (default 2)
#   BACKEND     cuda (default) or cpu: cpu builds without CUDA and runs the step benches on the
#               CPU (a check of this script without a GPU; no tests, no kernel benches)
# Exit status: 0 when both builds and NEW's tests passed.
. "$(dirname "$0")/help.sh"
set -u
cd "$(dirname "$0")/.." || exit 1
. scripts/gpus.sh
require_gpus 1 ab
[ $# -eq 2 ] || { echo "usage: scripts/ab.sh OLD_DIR NEW_DIR" >&2; exit 2; }
OLD_SRC=$(cd "$1" && pwd) || exit 2
NEW_SRC=$(cd "$2" && pwd) || exit 2
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # the step benches run in each side's tree
OUT=$(cd "$OUT" && pwd)
BUILDS=${BUILDS:-$OUT}
mkdir -p "$BUILDS"
BUILDS=$(cd "$BUILDS" && pwd)
OLD_ENV=${OLD_ENV:-}
NEW_ENV=${NEW_ENV:-}
BACKEND=${BACKEND:-cuda}
DEFAULT_TESTS="[barrier-linalg],[barrier-flash-fwd]~[.bench],[barrier-flash-bwd]~[.bench],"
DEFAULT_TESTS+="[barrier-flash]~[.bench],[wgmma]~[.bench]"
TESTS=${TESTS-$DEFAULT_TESTS}
BENCH_TAGS=${BENCH_TAGS:-}
BENCH_GREP=${BENCH_GREP:-ms}
DEFAULT_CASES="configs/paper-size.yaml --set barrier.lambda=0.03 --steps 20 --warmup 4;"
DEFAULT_CASES+="configs/gpt2-small.yaml --set barrier.lambda=0.03 --set barrier.positions=64"
DEFAULT_CASES+=" --steps 12 --warmup 3"
CASES=${CASES-$DEFAULT_CASES}
ROUNDS=${ROUNDS:-2}
export NCCL_NVLS_ENABLE=0
status=0

cuda_flag=ON
[ "$BACKEND" = cpu ] && cuda_flag=OFF
jobs=$(nproc)
build() {  # build NAME SRC: configure and build barrierlm (and test_gpu with CUDA)
  local dir="$BUILDS/build-$1" targets=(barrierlm)
  [ "$cuda_flag" = ON ] && targets+=(test_gpu)
  cmake -S "$2" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBARRIERLM_CUDA=$cuda_flag \
    -DCMAKE_CUDA_ARCHITECTURES=90a >"$OUT/configure-$1.log" 2>&1 &&
    cmake --build "$dir" -j "$build_jobs" --target "${targets[@]}" \
      >"$OUT/build-$1.log" 2>&1
}
# The build directory of each side, and a command prefix that sets its environment (expanded
# unquoted where it is used, so that its VAR=value words split).
declare -A bdir=([old]="$BUILDS/build-old" [new]="$BUILDS/build-new")
declare -A senv=([old]="env $OLD_ENV" [new]="env $NEW_ENV")
build_jobs=$((jobs / 2 > 0 ? jobs / 2 : 1))  # two builds at once
t0=$(date +%s)
if [ "$OLD_SRC" = "$NEW_SRC" ]; then  # one tree: build it once, both sides run it
  build_jobs=$jobs
  build new "$NEW_SRC"; rc_new=$?; rc_old=$rc_new
  bdir[old]=${bdir[new]}
else
  build old "$OLD_SRC" & pid_old=$!
  build new "$NEW_SRC" & pid_new=$!
  wait $pid_old; rc_old=$?
  wait $pid_new; rc_new=$?
fi
echo "builds: old rc $rc_old, new rc $rc_new, $(($(date +%s) - t0)) s (logs in $OUT)"
grep -h "Potential Performance Loss\|bytes spill stores" "$OUT/build-new.log" 2>/dev/null |
  grep -v " 0 bytes spill" | sed 's/^/  new: /' | cut -c1-160 | head -8
if [ $rc_old -ne 0 ] || [ $rc_new -ne 0 ]; then
  tail -n 5 "$OUT/build-old.log" "$OUT/build-new.log" 2>/dev/null
  exit 1
fi

if [ "$cuda_flag" = ON ] && [ -n "$TESTS" ]; then
  ${senv[new]} "${bdir[new]}/tests/test_gpu" "$TESTS" >"$OUT/tests-new.log" 2>&1
  rc=$?
  echo "tests (new, $TESTS): rc $rc;" \
    "$(grep -E 'test cases|All tests passed' "$OUT/tests-new.log" | tail -1)"
  [ $rc -ne 0 ] && status=1 && grep -B3 -A12 FAILED "$OUT/tests-new.log" | head -40
fi

if [ "$cuda_flag" = ON ] && [ -n "$BENCH_TAGS" ]; then
  for side in old new; do
    ${senv[$side]} "${bdir[$side]}/tests/test_gpu" "$BENCH_TAGS" >"$OUT/bench-$side.log" 2>&1
    grep -E "$BENCH_GREP" "$OUT/bench-$side.log" | sed "s/^/  $side: /" | cut -c1-200
  done
fi

# Step benches: OLD, NEW alternating, ROUNDS times per case; the median step and the losses.
# Each side runs in its own tree, so that a case's config paths name that tree's configs (an
# older binary may not know a newer config's keys).
declare -A src=([old]="$OLD_SRC" [new]="$NEW_SRC")
if [ -n "$CASES" ]; then
  printf '%-70s %-4s %10s %10s  %s\n' case side "round 1" "round 2+" losses
  IFS=';' read -r -a case_list <<<"$CASES"
  for args in "${case_list[@]}"; do
    declare -A ms=() loss=()
    for ((r = 1; r <= ROUNDS; ++r)); do
      for side in old new; do
        log="$OUT/step-$side-$r-$(echo "$args" | tr -c 'A-Za-z0-9' '_' | cut -c1-60).log"
        # shellcheck disable=SC2086
        (cd "${src[$side]}" && ${senv[$side]} "${bdir[$side]}/cmd/barrierlm" bench $args \
          --set device.backend=$BACKEND >"$log" 2>&1)
        ms[$side]+="$(sed -nE 's/^ *step +median ([0-9.]+) ms.*/\1/p' "$log") "
        loss[$side]="$(sed -nE 's/^ *steps .*loss (.*)$/\1/p' "$log")"
      done
    done
    for side in old new; do
      read -r -a v <<<"${ms[$side]}"
      printf '%-70s %-4s %10s %10s  %s\n' "${args:0:70}" "$side" "${v[0]:-?}" \
        "$(IFS=/; echo "${v[*]:1}")" "${loss[$side]:-?}"
    done
    [ "${loss[old]}" = "${loss[new]}" ] && echo "  (losses identical)" || echo "  (losses differ)"
    unset ms loss
  done
fi
exit $status
