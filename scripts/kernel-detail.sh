#!/usr/bin/env bash
# Why the barrier's tile kernels take the time they take: Nsight Compute's full detail pages for
# one launch of each, summarised one line per kernel (scripts/py/ncu_detail.py: time, registers,
# warps per scheduler, issue slots busy, tensor pipe, instructions per warp, top stalls), and,
# with OBJ_DIR, the opcode counts of their SASS (scripts/py/sass_histogram.py).  On the GPU
# machine, from the repository root, after a build:
#
#   scripts/kernel-detail.sh
#   OUT=/some/dir OBJ_DIR=build-gpu/cuda/CMakeFiles/blm_cuda.dir scripts/kernel-detail.sh
#
# Each kernel is profiled inside `barrierlm bench CONFIG --steps 1 --warmup 0` (the 4th launch,
# so the first-call plans are past).  The shapes: (a) = configs/gpt2-small.yaml with lambda 0.03
# and 64 positions, (b) = configs/paper-size.yaml with lambda 0.03 (exact).  About 1.5 minutes.
# Environment: BIN (build-gpu/cmd/barrierlm), OUT (a new temporary folder), OBJ_DIR (none: no
# SASS), NCU (found on PATH or under /opt/nvidia/nsight-compute).  Clocks are left alone.
# At which instructions one kernel's warps stall: scripts/py/ncu_stalls_by_instruction.py (its
# header gives the two ncu commands).
. "$(dirname "$0")/help.sh"
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
BIN=${BIN:-build-gpu/cmd/barrierlm}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
[ -n "$NCU" ] || { echo "kernel-detail.sh: ncu (Nsight Compute) not found" >&2; exit 1; }
[ -x "$BIN" ] || { echo "kernel-detail.sh: no barrierlm at $BIN (set BIN)" >&2; exit 1; }
export NCCL_NVLS_ENABLE=0

A=(configs/gpt2-small.yaml --set barrier.lambda=0.03 --set barrier.positions=64)
B=(configs/paper-size.yaml --set barrier.lambda=0.03)
detail() {  # detail TAG KERNEL_REGEX CONFIG ARGS...: one launch of the kernel, full sections
  local tag=$1 kernel=$2
  shift 2
  timeout 300 "$NCU" --set full --clock-control none -k "regex:$kernel" --launch-skip 3 \
    --launch-count 1 --print-details all --print-units base \
    "$BIN" bench "$@" --set device.backend=cuda --steps 1 --warmup 0 >"$OUT/$tag.txt" 2>&1 ||
    echo "kernel-detail.sh: $tag failed (see $OUT/$tag.txt)" >&2
}
detail a-s '^s_kernel$' "${A[@]}"
detail a-bwd 'flash_bwd_kernel' "${A[@]}"
detail a-gj '^forward_kernel$' "${A[@]}"
detail b-s '^s_kernel$' "${B[@]}"
detail b-bwd 'flash_bwd_kernel' "${B[@]}"
detail b-gj '^forward_kernel$' "${B[@]}"
python3 scripts/py/ncu_detail.py "$OUT"/a-*.txt "$OUT"/b-*.txt --json "$OUT/kernel-detail.json"

if [ -n "${OBJ_DIR:-}" ]; then
  CUOBJDUMP=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
  for pair in 'barrier_fused_s:wg8s_kernel' \
              'barrier_flash_bwd:flash_bwd_kernelILi64ELi4ELNS0_16FlashBwdProductsE2E13' \
              'barrier_tc_linalg:forward_kernelILi64'; do
    obj="$OBJ_DIR/${pair%%:*}.cu.o"
    [ -f "$obj" ] || { echo "kernel-detail.sh: no $obj" >&2; continue; }
    "$CUOBJDUMP" -sass "$obj" >"$OUT/${pair%%:*}.sass"
    python3 scripts/py/sass_histogram.py "$OUT/${pair%%:*}.sass" "${pair#*:}" | cut -c1-220
  done
fi
echo "details in $OUT"
