#!/usr/bin/env python3
"""Cross-check barrierlm's loss and gradients against PyTorch autograd in float64.

    barrierlm gradients CHECKPOINT --data FILE --lambda 1 --backend cuda --out DIR
    python3 scripts/crosscheck.py CHECKPOINT DIR [--device cuda] [--tol 1e-4]

Reads the checkpoint (scripts/py/blm_files.py), DIR/result.json, DIR/batch.bin, DIR/grads.bin;
recomputes CE, the barrier R and d(CE + lambda R)/d params with scripts/py/blm_torch.GPT in
float64 (exact barrier, the lambda, eps and barrier layers of result.json, attention and barrier
written from the spec's definitions), and compares:
  - loss, ce, barrier, min log det: |x - x_ref| / max(|x_ref|, 0.01)  (the floor keeps a barrier
    near 0, e.g. at initialisation where det J_t ~ 1, from turning rounding into a failure);
    N_R (the number of barrier terms) must be equal;
  - every parameter tensor: ||g - g_ref|| / ||g_ref|| (||g|| itself where g_ref = 0).
Prints a table (with each tensor's barrier share ||lambda dR/dp|| / ||dL/dp||: a small share
means the barrier's gradient is hardly tested there; raise --lambda in `barrierlm gradients`).
Exit status: 0 all within --tol, 1 some error above it, 2 bad input.

Tolerances: a float32 backend agrees to ~1e-5 (1e-4 is the default); barrierlm's fp64 CPU
backend (grads stored as float32) to ~1e-7 (use --tol 1e-6).
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))

import blm_files  # noqa: E402  (stdlib only)

SCALAR_FLOOR = 0.01
# Literal barrier (B*H*T*T*dh float64 values, a few times over) up to this size, else the
# S_t form, which in float64 loses nothing that matters here.
LITERAL_BARRIER_BYTES = 8 << 30


def fail_input(message):
    print(f"crosscheck: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint.bin (or a run directory holding one)")
    ap.add_argument("dir", help="the --out directory of `barrierlm gradients`")
    ap.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest relative error allowed (default 1e-4)")
    ap.add_argument("--barrier-impl", choices=["auto", "literal", "fast"], default="auto",
                    help="literal (spec section 2 as written) or fast (S_t - qbar kbar^T); auto: "
                         "literal unless it needs more than 8 GiB")
    return ap.parse_args()


def load_inputs(args):
    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.bin")
    ck = blm_files.read_checkpoint(path)
    run = blm_files.read_gradients_dir(args.dir)
    res = run["result"]
    if res["model"] != ck["model"]:
        fail_input(f"{args.dir}/result.json is for model {res['model']}, the checkpoint has {ck['model']}")
    if not 1 <= res["T"] <= ck["model"]["seq_len"] or res["B"] < 1:
        fail_input(f"{args.dir}/result.json: batch {res['B']} x {res['T']} does not fit the model")
    return path, ck, run


def check_layout(bt, ck, res, where):
    """The layout of result.json and the checkpoint's tensors must be barrierlm's (params.h)."""
    cfg = bt.ModelConfig(**ck["model"])
    expected, offset = [], 0
    for name, shape in bt.param_layout(cfg):
        expected.append((name, tuple(shape), offset))
        offset += math.prod(shape)
    got = [(t["name"], tuple(t["shape"]), t["offset"]) for t in res["layout"]]
    if got != expected or res["num_params"] != offset:
        fail_input(f"{where}/result.json: parameter layout differs from core/params.h's")
    tensors = [(n, tuple(s)) for n, s, _ in ck["tensors"]]
    if tensors != [(n, s) for n, s, _ in expected]:
        fail_input("checkpoint tensors differ from the layout of core/params.h")
    return cfg, expected


def torch_reference(torch, bt, cfg, ck, run, device, impl):
    """Loss terms and gradients (total and the barrier part) in float64 on `device`."""
    res = run["result"]
    B, T = res["B"], res["T"]
    barrier = bt.BarrierConfig(lam=float(res["lambda"]), eps=float(res["eps"]),
                               layers=[int(l) for l in res["barrier_layers"]])
    model = bt.GPT(cfg, barrier).to(device=device, dtype=torch.float64)
    params = torch.cat([torch.frombuffer(bytearray(raw), dtype=torch.float32) for _, _, raw in ck["tensors"]])
    model.load_flat(params.to(device=device, dtype=torch.float64))
    x = torch.frombuffer(bytearray(run["inputs"]), dtype=torch.int32).long().view(B, T).to(device)
    y = torch.frombuffer(bytearray(run["targets"]), dtype=torch.int32).long().view(B, T).to(device)
    if int(x.min()) < 0 or int(max(x.max(), y.max())) >= cfg.vocab_size or int(y.min()) < 0:
        fail_input("batch.bin holds token ids outside the vocabulary")
    H, dh = cfg.n_head, cfg.d_model // cfg.n_head
    if impl == "auto":
        impl = "literal" if 4 * 8 * B * H * T * T * dh <= LITERAL_BARRIER_BYTES else "fast"
    terms = model(x, y, want_barrier=True, fast_barrier=(impl == "fast"), attn_impl="manual")
    params_list = [model.p(n) for n in model.names]

    def flat_grad(value, retain):
        gs = torch.autograd.grad(value, params_list, retain_graph=retain, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(gs, params_list)])

    with_barrier = barrier.lam != 0 and terms["n_R"] > 0
    g_ce = flat_grad(terms["ce"], retain=with_barrier)
    g_r = flat_grad(terms["barrier"], retain=False) * barrier.lam if with_barrier else torch.zeros_like(g_ce)
    # barrierlm's result.json writes min log det as null both when no term was counted and when
    # some det J_t <= 0 (-inf).
    min_logdet = terms["min_logdet"]
    min_logdet = None if min_logdet is None or min_logdet == -math.inf else min_logdet
    scalars = {"loss": float(terms["loss"]), "ce": float(terms["ce"]),
               "barrier": float(terms["barrier"]), "min_logdet": min_logdet,
               "barrier_terms": terms["n_R"]}
    return scalars, (g_ce + g_r).cpu(), g_r.cpu(), impl


def scalar_error(got, ref):
    """None (JSON null: not finite) matches only None."""
    if got is None or ref is None:
        return 0.0 if got is None and ref is None else math.inf
    return abs(got - ref) / max(abs(ref), SCALAR_FLOOR)


def show(value):
    return "null" if value is None else f"{value:.12g}"


def compare(res, grads, ref, g_total, g_barrier, layout, tol):
    """Prints the table; returns the number of failures."""
    failures = 0
    print(f"{'quantity':<22}{'barrierlm':>20}{'torch fp64':>20}{'rel. error':>12}")
    for key in ("loss", "ce", "barrier", "min_logdet"):
        err = scalar_error(res[key], ref[key])
        bad = not err <= tol
        failures += bad
        print(f"{key:<22}{show(res[key]):>20}{show(ref[key]):>20}{err:>12.2e}{'  FAIL' if bad else ''}")
    bad = res["barrier_terms"] != ref["barrier_terms"]
    failures += bad
    print(f"{'barrier_terms (N_R)':<22}{res['barrier_terms']:>20}{ref['barrier_terms']:>20}"
          f"{'' if not bad else '  FAIL (must be equal)':>12}")
    print()
    print(f"{'tensor':<18}{'shape':<14}{'|g_ref|':>11}{'rel. error':>12}{'barrier share':>15}")
    worst = 0.0
    for name, shape, off in layout:
        n = math.prod(shape)
        g, r, rb = grads[off:off + n], g_total[off:off + n], g_barrier[off:off + n]
        ref_norm = float(r.norm())
        diff = float((g - r).norm())
        err = diff / ref_norm if ref_norm > 0 else diff
        share = float(rb.norm()) / ref_norm if ref_norm > 0 else 0.0
        bad = not err <= tol  # NaN fails too
        failures += bad
        worst = max(worst, err) if not math.isnan(err) else math.inf
        print(f"{name:<18}{'x'.join(map(str, shape)):<14}{ref_norm:>11.3e}{err:>12.2e}{share:>15.3f}"
              f"{'  FAIL' if bad else ''}")
    total = float((grads - g_total).norm()) / max(float(g_total.norm()), 1e-300)
    print(f"\nwhole gradient: rel. error {total:.2e}; worst tensor {worst:.2e}; tolerance {tol:g}")
    return failures


def main():
    args = parse_args()
    try:
        import torch
        import blm_torch as bt
    except ImportError as e:
        fail_input(f"needs PyTorch ({e})")
    try:
        ck_path, ck, run = load_inputs(args)
    except blm_files.FormatError as e:
        fail_input(str(e))
    res = run["result"]
    cfg, layout = check_layout(bt, ck, res, args.dir)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail_input("--device cuda: no GPU visible to PyTorch (use --device cpu)")
    device = torch.device(args.device)
    ref, g_total, g_barrier, impl = torch_reference(torch, bt, cfg, ck, run, device, args.barrier_impl)
    grads = torch.frombuffer(bytearray(run["grads"]), dtype=torch.float32).double()
    print(f"crosscheck: {ck_path} (step {ck['step']}, checksum "
          f"{'verified' if ck['checksum_verified'] else 'not verified (large file)'})")
    print(f"barrierlm: {res['backend']}, batch {res['B']} x {res['T']}, lambda {res['lambda']:g}, "
          f"eps {res['eps']:g}, barrier layers {res['barrier_layers']}")
    print(f"torch {torch.__version__}: float64 autograd on {device}, barrier {impl}\n")
    failures = compare(res, grads, ref, g_total, g_barrier, layout, args.tol)
    print("PASS" if failures == 0 else f"FAIL: {failures} value(s) above tolerance {args.tol:g}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
