#!/usr/bin/env python3
"""Check `barrierlm export` against Hugging Face transformers itself.

    barrierlm export CHECKPOINT -o DIR
    python3 scripts/py/hf_check.py CHECKPOINT DIR [--device cuda] [--tol 1e-5]
    python3 scripts/py/hf_check.py --write-random DIR [--shape L,H,D,T,V] [--hf-init]
    python3 scripts/py/hf_check.py --tokens TEXT SHARD DIR

The third form checks barrierlm's GPT-2 tokenizer against transformers': SHARD is
`barrierlm tokenize TEXT --no-eot --vocab DIR -o SHARD`, and its ids must be those of
GPT2Tokenizer.from_pretrained(DIR).encode(TEXT) (DIR: vocab.json and merges.txt).

The second form is the way in (train.init): it writes a randomly initialised GPT-2 as
transformers saves it, DIR/lm (GPT2LMHeadModel: "transformer." names) and DIR/base (GPT2Model:
the hub's names, as OpenAI's GPT-2 has them), for `barrierlm train --set train.init=DIR/lm
--set train.steps=0`, whose checkpoint the first form then compares with DIR/lm.

Loads DIR with transformers' GPT2LMHeadModel.from_pretrained (and, when DIR has vocab.json and
merges.txt, GPT2Tokenizer.from_pretrained), runs it on random token sequences (float64), and
compares its logits with scripts/py/blm_torch.GPT on the checkpoint's own parameters
(blm_torch is the model scripts/crosscheck.py holds against barrierlm's CPU and CUDA backends).
Prints the largest difference relative to the largest logit.
Exit status: 0 within --tol; 1 above it; 2 bad input; 77 transformers is not installed (skipped).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import blm_files  # noqa: E402  (stdlib only)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="checkpoint.bin (or a run directory holding one)")
    ap.add_argument("dir", nargs="?", help="the directory `barrierlm export` wrote")
    ap.add_argument("--tokens", nargs=3, metavar=("TEXT", "SHARD", "DIR"),
                    help="compare a tokenize shard with transformers' GPT2Tokenizer")
    ap.add_argument("--write-random", metavar="DIR",
                    help="write a random GPT-2 into DIR/lm and DIR/base")
    ap.add_argument("--shape", default="2,2,32,64,50257",
                    help="n_layer,n_head,n_embd,n_positions,vocab_size of --write-random")
    ap.add_argument("--hf-init", action="store_true",
                    help="--write-random keeps transformers' own initialisation (weights "
                         "N(0, 0.02), biases 0, gains 1: a model that trains like GPT-2) instead "
                         "of N(0, 0.3) everywhere (every tensor's layout visible in the logits)")
    ap.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    ap.add_argument("--tol", type=float, default=1e-5, help="largest relative error allowed")
    args = ap.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"hf_check: skipped: {e}")
        return 77
    if args.tokens:
        text_path, shard_path, vocab_dir = args.tokens
        text = open(text_path, encoding="utf-8").read()
        data = open(shard_path, "rb").read()
        import array
        header = array.array("i", data[:1024])
        ours = array.array("H", data[1024:]).tolist()
        if header[0] != 20240520 or header[2] != len(ours):
            print(f"hf_check: error: {shard_path} is not a .bin shard", file=sys.stderr)
            return 2
        tok = transformers.GPT2Tokenizer.from_pretrained(vocab_dir)
        theirs = tok.encode(text)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
        print(f"GPT2Tokenizer (transformers {transformers.__version__}) on {text_path} "
              f"({len(text)} characters): {len(theirs)} ids; barrierlm: {len(ours)}; "
              + ("identical" if first is None else f"first difference at id {first}"))
        return 0 if first is None else 1
    if args.write_random:
        L, H, D, T, V = (int(x) for x in args.shape.split(","))
        config = transformers.GPT2Config(n_layer=L, n_head=H, n_embd=D, n_positions=T,
                                         vocab_size=V, activation_function="gelu_new")
        torch.manual_seed(3)
        model = transformers.GPT2LMHeadModel(config)
        if not args.hf_init:
            with torch.no_grad():  # every weight random: biases and gains start at 0 and 1
                for p in model.parameters():
                    p.normal_(0.0, 0.3)
        model.save_pretrained(os.path.join(args.write_random, "lm"))
        model.transformer.save_pretrained(os.path.join(args.write_random, "base"))
        print(f"hf_check: wrote {args.write_random}/lm and /base ({config.n_layer} layers)")
        return 0
    if not args.checkpoint or not args.dir:
        ap.error("CHECKPOINT and DIR are needed (or --write-random DIR)")
    import blm_torch as bt

    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.bin")
    try:
        ck = blm_files.read_checkpoint(path, verify_checksum=False)
    except blm_files.FormatError as e:
        print(f"hf_check: error: {e}", file=sys.stderr)
        return 2
    cfg = bt.ModelConfig(**ck["model"])
    ours = bt.GPT(cfg).to(device=args.device, dtype=torch.float64)
    flat = torch.cat([torch.frombuffer(bytearray(raw), dtype=torch.float32)
                      for _, _, raw in ck["tensors"]])
    ours.load_flat(flat.to(device=args.device, dtype=torch.float64))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(args.dir, torch_dtype=torch.float64)
    theirs = theirs.to(args.device).eval()

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=gen).to(args.device)
    with torch.no_grad():
        want = ours(x)
        got = theirs(x).logits
    err = float((got - want).abs().max() / want.abs().max())
    print(f"transformers {transformers.__version__}, {cfg}: logits [4, {cfg.seq_len}, "
          f"{cfg.vocab_size}], largest |difference| / largest |logit| = {err:.3g} "
          f"(tolerance {args.tol:g})")
    if os.path.exists(os.path.join(args.dir, "vocab.json")):
        tok = transformers.GPT2Tokenizer.from_pretrained(args.dir)
        text = "The quick brown fox's margin, 1234 tokens!\n"
        ids = tok.encode(text)
        print(f"GPT2Tokenizer: {len(tok)} tokens; '{text.strip()}' -> {len(ids)} ids, decodes "
              f"back: {tok.decode(ids) == text}")
    return 0 if err <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
