# Sourced by the GPU scripts (gpu-check, bench, ab, ddp-check, study): they start with a check of
# the GPUs they need, so that on a machine without them they say so in one line at once instead
# of building for minutes and then failing every stage.
#
#   require_gpus N NAME    exits 77 (the "skipped" status) when fewer than N GPUs are visible
visible_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

require_gpus() {
  local have plural=""
  have=$(visible_gpus)
  [ "$1" -gt 1 ] && plural=s
  if [ "$have" -lt "$1" ]; then
    echo "$2: needs $1 NVIDIA GPU$plural, found $have (nvidia-smi -L); skipped" >&2
    exit 77
  fi
}
