#!/usr/bin/env bash
# configs/gpt2-finetune.yaml's recipe, end to end, on a machine without the network: the hub's
# GPT-2 small is replaced by a GPT-2 small of the same shape that transformers initialises and
# saves in the hub's layout (GPT2Model's tensor names), and OpenAI's vocabulary by a byte-level BPE
# of GPT-2's size learnt on the Brown corpus (Hugging Face tokenizers).  Everything else is the
# recipe's header, command by command:
#
#   vocab      tokenizers learns vocab.json and merges.txt (50257 tokens, <|endoftext|> among them)
#   weights    hf_check.py --write-random --hf-init: GPT-2 small as transformers saves it
#   tokenize   barrierlm tokenize: Brown's train text into shards (train_*.bin), its val text
#   base       train with train.steps 0: the initial weights checked and saved as step 0
#   eval-base  eval --noise 0,0.1 of those weights; margins-base their margins
#   margins-hub  margins of the hub-style directory itself (no run), which must equal base's
#   finetune   train STEPS steps with lambda 0.03 and 16 sampled positions (the recipe's)
#   eval, margins, sample, export   of the fine-tuned run (sample: greedy on the GPU and the
#              CPU); hf-check: transformers' logits of the export
#              against the checkpoint's (float64, scripts/py/hf_check.py)
#
# Usage (repository root, a CUDA build in BUILD_DIR or made here; PyTorch, transformers and
# tokenizers in PY; the Brown corpus of scripts/get-data.sh in data/corpus/brown):
#   [BUILD_DIR=build-gpu] [WORK=/tmp/finetune-check] [STEPS=60] [OUT=dir] scripts/finetune-check.sh
# Prints one line per stage; every log is in WORK/logs (and OUT/finetune-check.tar.gz with OUT).
# Exit status: 0 when every stage passed, 77 when a prerequisite is missing (skipped).
. "$(dirname "$0")/help.sh"
set -u
cd "$(dirname "$0")/.."

BUILD_DIR=${BUILD_DIR:-build-gpu}
WORK=${WORK:-/tmp/finetune-check}
STEPS=${STEPS:-60}
PY=${PY:-python3}
BIN="$BUILD_DIR/cmd/barrierlm"
BROWN=data/corpus/brown

if ! "$PY" -c "import torch, transformers, tokenizers" 2>/dev/null; then
  echo "finetune-check: skipped: $PY lacks torch, transformers or tokenizers"; exit 77
fi
if [ ! -f "$BROWN/train.txt" ] || [ ! -f "$BROWN/val.txt" ]; then
  echo "finetune-check: skipped: no $BROWN/train.txt and val.txt (scripts/get-data.sh)"; exit 77
fi
if [ ! -x "$BIN" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBARRIERLM_CUDA=ON >/dev/null &&
    cmake --build "$BUILD_DIR" -j "$(nproc)" --target barrierlm >/dev/null ||
    { echo "finetune-check: the build failed"; exit 1; }
fi

rm -rf "$WORK"
mkdir -p "$WORK/logs"
HF="$WORK/hf/base"           # the stand-in for the hub's directory (weights and vocabulary)
RUNS="$WORK/runs"
results=()
failed=0

# stage NAME NOTE-COMMAND -- COMMAND...: runs COMMAND into WORK/logs/NAME.log; on success the
# note is NOTE-COMMAND's output (empty: none).
stage() {
  local name=$1 note_cmd=$2
  shift 3
  local t0 t1 rc note
  t0=$(date +%s%N)
  "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  if [ $rc -eq 0 ]; then
    note=$(eval "$note_cmd" 2>/dev/null | head -1)
    results+=("$(printf '%-14s %-6s %7s  %s' "$name" pass "$secs" "$note")")
  else
    note=$(tail -1 "$WORK/logs/$name.log")
    results+=("$(printf '%-14s %-6s %7s  %s' "$name" FAIL "$secs" "$note")")
    failed=1
  fi
  return $rc
}

# The recipe's config, pointed at WORK; "$@" adds overrides.
train_recipe() {
  "$BIN" train configs/gpt2-finetune.yaml --set train.out_dir="$RUNS" \
    --set "data.train=$WORK/data/train_*.bin" --set data.val="$WORK/data/val.bin" \
    --set data.vocab="$HF" --set train.init="$HF" --set train.eval_batches=4 "$@"
}

# Notes: figures from the files each stage wrote.
eval_note() {
  "$PY" -c "
import json, sys
d = json.load(open(sys.argv[1]))
l = {x['noise']: x for x in d['levels']}
print(f\"clean CE {l[0]['ce_mean']:.4f}, {l[0]['bpb_mean']:.4f} bits/byte; noise 0.1 CE \"
      f\"{l[0.1]['ce_mean']:.4f} ({100 * l[0.1]['ce_rel_degradation']:+.2f}%)\")" "$1"
}
margins_note() {
  "$PY" -c "
import json, sys
d = json.load(open(sys.argv[1]))
m = [x for s in d['token_margins'] for x in s['margin'] if x is not None]
print(f'{len(m)} token margins, smallest {min(m):.4f}, {len(d[\"below_tau\"])} below tau')" "$1"
}
train_note() {
  "$PY" -c "
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tr = [l for l in lines if l['kind'] == 'train']
ev = [l for l in lines if l['kind'] == 'eval']
s = f'step {tr[-1][\"step\"]}, loss {tr[0][\"loss\"]:.3f} -> {tr[-1][\"loss\"]:.3f}, '
s += f'{tr[-1][\"tokens_per_s\"] / 1e3:.0f}k tok/s' if tr else ''
if ev: s += f', val CE {ev[-1][\"val_ce\"]:.4f}'
print(s)" "$1"
}

stage vocab "cat $WORK/vocab.txt" -- "$PY" -c "
import os, sys, tokenizers
tok = tokenizers.ByteLevelBPETokenizer()
tok.train([sys.argv[1]], vocab_size=50257, min_frequency=2, special_tokens=['<|endoftext|>'])
os.makedirs(sys.argv[2], exist_ok=True)
tok.save_model(sys.argv[2])
open(sys.argv[3], 'w').write(f'{tok.get_vocab_size()} tokens learnt on {sys.argv[1]}\n')
" "$BROWN/train.txt" "$WORK/vocab" "$WORK/vocab.txt"
stage weights "echo GPT-2 small as transformers initialises it, in the hub layout" -- \
  "$PY" scripts/py/hf_check.py --write-random "$WORK/hf" --shape 12,12,768,1024,50257 --hf-init
cp "$WORK/vocab/vocab.json" "$WORK/vocab/merges.txt" "$HF/" 2>/dev/null
stage tokenize "grep -h '^tokenize:' $WORK/logs/tokenize.log | head -1 | cut -c11-" -- bash -c "
  '$BIN' tokenize '$BROWN/train.txt' -o '$WORK/data/train.bin' --vocab '$HF' \
      --shard-tokens 500000 &&
  '$BIN' tokenize '$BROWN/val.txt' -o '$WORK/data/val.bin' --vocab '$HF'"
stage base "grep -h '^val   step 0:' $WORK/logs/base.log | cut -c7-" -- \
  train_recipe --set train.steps=0 --set train.run_name=gpt2-base
stage eval-base "eval_note $RUNS/gpt2-base/eval.json" -- \
  "$BIN" eval "$RUNS/gpt2-base" --noise 0,0.1 --draws 2 --out "$RUNS/gpt2-base/eval.json"
stage margins-base "margins_note $RUNS/gpt2-base/margins/margins.json" -- \
  "$BIN" margins "$RUNS/gpt2-base"
stage margins-hub "echo the hub directory as it is: the same margins.csv as base" -- bash -c "
  '$BIN' margins '$HF' --data '$WORK/data/val.bin' --out '$WORK/margins-hub' &&
  cmp '$WORK/margins-hub/margins.csv' '$RUNS/gpt2-base/margins/margins.csv'"
stage finetune "train_note $RUNS/gpt2-finetune/metrics.jsonl" -- \
  train_recipe --set train.steps="$STEPS" --set train.warmup=10 --set train.eval_interval=30 \
  --set train.log_interval=10
stage eval "eval_note $RUNS/gpt2-finetune/eval.json" -- \
  "$BIN" eval "$RUNS/gpt2-finetune" --noise 0,0.1 --draws 2 --out "$RUNS/gpt2-finetune/eval.json"
stage margins "margins_note $RUNS/gpt2-finetune/margins/margins.json" -- \
  "$BIN" margins "$RUNS/gpt2-finetune"
# Greedy text from the fine-tuned run on the GPU and on the CPU (incremental decoding there):
# the note says how many of the 40 tokens' characters agree (bf16 against fp32 may part on a
# near tie).
stage sample "$PY -c \"
import os, sys
a, b = (open(os.path.join(sys.argv[1], f), encoding='utf-8', errors='replace').read()
        for f in ('sample-gpu.txt', 'sample-cpu.txt'))
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f'greedy GPU and CPU texts agree on {n} of {len(a)} characters')\" $WORK" -- bash -c "
  '$BIN' sample '$RUNS/gpt2-finetune' --prompt 'The' --tokens 40 --temperature 0 \
      > '$WORK/sample-gpu.txt' &&
  '$BIN' sample '$RUNS/gpt2-finetune' --prompt 'The' --tokens 40 --temperature 0 \
      --backend cpu > '$WORK/sample-cpu.txt'"
stage export "ls $WORK/export | tr '\n' ' '" -- \
  "$BIN" export "$RUNS/gpt2-finetune" -o "$WORK/export"
HF_NOTE="grep -h -o 'largest |difference| / largest |logit| = [^ ]*' $WORK/logs/hf-check.log"
stage hf-check "$HF_NOTE" -- "$PY" scripts/py/hf_check.py "$RUNS/gpt2-finetune" "$WORK/export"

printf '%-14s %-6s %7s  %s\n' stage result seconds note
printf '%s\n' "${results[@]}"
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/finetune-check.tar.gz" -C "$WORK" logs runs/gpt2-base/eval.json \
    runs/gpt2-finetune/metrics.jsonl runs/gpt2-finetune/eval.json 2>/dev/null
fi
exit $failed
