#!/usr/bin/env bash
# The quickstart: from a fresh checkout to a trained model, its robustness to embedding noise and
# its stability margins, in one command.
#
#   scripts/quickstart.sh                 # everything, with configs/quickstart.yaml
#   CONFIG=configs/tiny.yaml scripts/quickstart.sh     # another config
#   BUILD_DIR=b OUT_DIR=r scripts/quickstart.sh        # other build / runs directories
#   scripts/quickstart.sh --set barrier.lambda=0       # extra arguments go to `barrierlm train`
#   NATIVE=0 scripts/quickstart.sh                     # a portable build (no -march=native)
#
# Steps:
#   1. install missing packages (scripts/install-deps.sh; needs sudo only when something is missing)
#   2. build barrierlm (Release, all cores, -march=native: the binary is for this machine only,
#      about 10% faster on the CPU).  Where no GPU is visible the CUDA backend is left out:
#      compiling it takes minutes and it could not run here anyway.
#   3. fetch the Brown corpus (scripts/get-data.sh; skipped when already there)
#   4. train CONFIG into OUT_DIR/quickstart-<time>
#   5. barrierlm eval --noise 0,0.05,0.1,0.2 (with its plot) and barrierlm margins on the
#      result; print where things are
. "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
CONFIG=${CONFIG:-configs/quickstart.yaml}
OUT_DIR=${OUT_DIR:-runs}
NATIVE=${NATIVE:-1}
started=$(date +%s)

elapsed() { local s=$(( $(date +%s) - started )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
banner() { printf '\n\033[1m== %s\033[0m  [%s]\n' "$*" "$(elapsed)"; }

banner "1/5 dependencies"
scripts/install-deps.sh

banner "2/5 build ($BUILD_DIR, Release, $(nproc) cores)"
cmake_args=(-DCMAKE_BUILD_TYPE=Release)
if [ "$NATIVE" = 1 ]; then cmake_args+=(-DBARRIERLM_NATIVE=ON); else cmake_args+=(-DBARRIERLM_NATIVE=OFF); fi
command -v ninja >/dev/null && [ ! -f "$BUILD_DIR/Makefile" ] && cmake_args+=(-G Ninja)
if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
  echo "no GPU visible: building the CPU backend only"
  cmake_args+=(-DBARRIERLM_CUDA=OFF)
fi
cmake -S . -B "$BUILD_DIR" "${cmake_args[@]}" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" --target barrierlm
bin="$BUILD_DIR/cmd/barrierlm"

banner "3/5 data"
scripts/get-data.sh

run_name="quickstart-$(date +%Y%m%d-%H%M%S)"
run_dir="$OUT_DIR/$run_name"
banner "4/5 train $CONFIG -> $run_dir"
"$bin" train "$CONFIG" --set train.out_dir="$OUT_DIR" --set train.run_name="$run_name" "$@"

banner "5/5 evaluate"
"$bin" eval "$run_dir" --noise 0,0.05,0.1,0.2 --draws 3 --out "$run_dir/eval.json" \
  --plot "$run_dir/noise.svg"
"$bin" margins "$run_dir" --out "$run_dir/margins"

# The clean validation bits per byte, from eval.json (the first level is the clean one).
bpb=$(grep -m1 '"bpb_mean"' "$run_dir/eval.json" | sed -E 's/.*"bpb_mean": *([^,]*).*/\1/' |
      awk '{ printf "%.4f", $1 }' || true)
target=""
if [ -n "$bpb" ] && awk -v b="$bpb" 'BEGIN { exit !(b > 2.8) }'; then
  target="  (above the quickstart's aim of 2.8: a longer run or a GPU gets there)"
fi
banner "done in $(elapsed)"
cat <<EOF
run directory      $run_dir/   (config.yaml, metrics.jsonl, checkpoint.bin)
noise robustness   $run_dir/eval.json
margins            $run_dir/margins/margins.json, margins.csv
plots              $run_dir/curves.svg, noise.svg,
                   $run_dir/margins/margins_hist.svg, margins_strip.html (open in a browser)
validation         ${bpb:-?} bits/byte (clean)$target

next:
  $bin eval $run_dir --noise 0,0.05,0.1,0.2,0.4 --draws 10     # more levels and draws
  $bin sample $run_dir --prompt "The "
  $bin train $CONFIG --set barrier.lambda=0 --set train.run_name=baseline   # the baseline
EOF
