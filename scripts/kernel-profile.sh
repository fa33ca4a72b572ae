#!/usr/bin/env bash
# Where the GPU time of a training step goes, kernel by kernel (Nsight Compute's
# gpu__time_duration per launch, summed by kernel name).  Run on the GPU machine:
#
#   scripts/kernel-profile.sh CONFIG [--set key=value ...]     # e.g. configs/paper-size.yaml
#   OUT=/some/dir STEPS=2 scripts/kernel-profile.sh ...        # also keep the CSV and JSON there
#
# It profiles `barrierlm bench CONFIG --steps STEPS --warmup 1` (all STEPS + 1 steps; the table is
# per step).  ncu serialises kernels, so the sum is kernel time without launch gaps: compare it
# with bench's step time to see the gaps.  Clocks are left alone (--clock-control none).
. "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/kernel-profile.sh CONFIG [--set key=value ...]" >&2; exit 2; }
BIN=${BIN:-build-gpu/cmd/barrierlm}
STEPS=${STEPS:-2}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)}
[ -n "$NCU" ] || { echo "kernel-profile.sh: ncu (Nsight Compute) not found" >&2; exit 1; }
export NCCL_NVLS_ENABLE=0
tag=$(basename "$1" .yaml)-$(date +%H%M%S)
"$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --print-units base \
  --log-file "$OUT/$tag.csv" "$BIN" bench "$@" --set device.backend=cuda --steps "$STEPS" --warmup 1 \
  >"$OUT/$tag.bench.txt"
python3 scripts/py/kernel_profile.py "$OUT/$tag.csv" --steps $((STEPS + 1)) --json "$OUT/$tag.json"
