#!/usr/bin/env bash
# Where the GPU sits idle during a training step (Nsight Systems trace, graph nodes one by one):
# the step's length, its busy time and the gaps between kernels, summed by the kernels around
# them.  The companion of scripts/kernel-profile.sh, which sums the kernels themselves.  Run on the
# GPU machine:
#
#   scripts/timeline-gaps.sh CONFIG [--set key=value ...]        # e.g. configs/gpt2-small.yaml
#   OUT=/some/dir STEPS=6 scripts/timeline-gaps.sh ...           # keep the trace and CSV there
#
# It traces `barrierlm bench CONFIG --steps STEPS --warmup 2`; steps are cut at AdamW's last
# launch (MARKER) and the first step traced is dropped.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/timeline-gaps.sh CONFIG [--set key=value ...]" >&2; exit 2; }
BIN=${BIN:-build-gpu/cmd/barrierlm}
STEPS=${STEPS:-6}
MARKER=${MARKER:-adamw}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
NSYS=${NSYS:-$(command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys \
  2>/dev/null | head -1)}
[ -n "$NSYS" ] || { echo "timeline-gaps.sh: nsys (Nsight Systems) not found" >&2; exit 1; }
export NCCL_NVLS_ENABLE=0
tag=$(basename "$1" .yaml)-$(date +%H%M%S)
"$NSYS" profile --trace cuda --cuda-graph-trace node --sample none --cpuctxsw none \
  --output "$OUT/$tag" --force-overwrite true \
  "$BIN" bench "$@" --set device.backend=cuda --steps "$STEPS" --warmup 2 >"$OUT/$tag.bench.txt"
"$NSYS" stats --report cuda_gpu_trace --format csv --output "$OUT/$tag" "$OUT/$tag.nsys-rep" \
  >/dev/null
python3 scripts/py/timeline_gaps.py "$OUT/${tag}_cuda_gpu_trace.csv" --marker "$MARKER" \
  --json "$OUT/$tag.gaps.json"
