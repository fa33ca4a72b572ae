#!/usr/bin/env bash
# Where the GPU sits idle during a training step: the step's length, its busy time and the gaps
# between kernels, summed by the kernels around them.  The companion of scripts/kernel-profile.sh,
# which sums the kernels themselves.  Run on the GPU machine:
#
#   scripts/timeline-gaps.sh CONFIG [--set key=value ...]        # e.g. configs/gpt2-small.yaml
#   OUT=/some/dir STEPS=6 scripts/timeline-gaps.sh ...           # keep the trace and CSV there
#   API=1 scripts/timeline-gaps.sh ...     # also the host's CUDA runtime calls during the idle time
#
# It traces `barrierlm bench CONFIG --steps STEPS --warmup 2` with the build's CUPTI recorder
# (cuda/tools/cupti_trace.cpp, loaded through CUDA_INJECTION64_PATH; TRACE_LIB), every graph node
# as its own kernel; steps are cut where AdamW's kernel ends (MARKER), the first traced step
# dropped.
. "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/timeline-gaps.sh CONFIG [--set key=value ...]" >&2; exit 2; }
BIN=${BIN:-build-gpu/cmd/barrierlm}
TRACE_LIB=${TRACE_LIB:-$(dirname "$(dirname "$BIN")")/cuda/libblm_cupti_trace.so}
STEPS=${STEPS:-6}
MARKER=${MARKER:-adamw}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
[ -f "$TRACE_LIB" ] ||
  { echo "timeline-gaps.sh: $TRACE_LIB not found (built where CUPTI is)" >&2; exit 1; }
export NCCL_NVLS_ENABLE=0
tag=$(basename "$1" .yaml)-$(date +%H%M%S)
CUDA_INJECTION64_PATH=$(cd "$(dirname "$TRACE_LIB")" && pwd)/$(basename "$TRACE_LIB") \
  BLM_TRACE_CSV="$OUT/$tag.trace.csv" BLM_TRACE_API="${API:-0}" \
  "$BIN" bench "$@" --set device.backend=cuda --steps "$STEPS" --warmup 2 >"$OUT/$tag.bench.txt"
grep -E '^  step ' "$OUT/$tag.bench.txt" || true
python3 scripts/py/timeline_gaps.py "$OUT/$tag.trace.csv" --marker "$MARKER" \
  --json "$OUT/$tag.gaps.json"
