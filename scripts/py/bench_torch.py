#!/usr/bin/env python3
"""The PyTorch side of scripts/bench.sh: times a training step of barrierlm's model in PyTorch,
tuned as one would tune it (torch.compile, scaled_dot_product_attention, bf16 autocast with fp32
master weights, fused AdamW, foreach global-norm clipping), on the settings of a
`barrierlm bench` JSON, so both sides run the same model, batch, sequence, optimizer and clip.

    python3 scripts/py/bench_torch.py --like blm.json [--steps N] [--warmup N] [--out torch.json]
    python3 scripts/py/bench_torch.py --matmul-peak [--out peak.json]

The model is scripts/py/blm_torch.py's GPT (imported, not copied): the spec's model and, for
lambda > 0, PyTorch autograd of the same barrier objective (blm_torch.barrier_dets_fast: one
[T, T] x [T, dh^2] matmul per (b, h), then batched LU determinants).  The barrier runs in fp32
outside autocast (barrierlm's barrier is fp32 too; bf16 determinants of I - C would be a
different objective), with TF32 off unless --tf32.  With barrier.positions = K > 0 each
sequence counts K positions drawn uniformly from [2, T) per step, as barrierlm draws them
(blm_torch computes every position's determinant and masks: it has no sampled form).

One step: forward under autocast, loss.backward(), clip_grad_norm_, fused AdamW step,
zero_grad; then torch.cuda.synchronize().  Times are wall-clock per step after --warmup untimed
steps (the first of which compiles), median over --steps.  Tokens are random (torch.randint over
the vocabulary), four distinct batches cycled.  Parameters: GPT-2 initialisation as
core/params.h (N(0, 0.02), residual projections / sqrt(2L), biases 0, LayerNorm gains 1);
weight decay on the matrices and embeddings only, as barrierlm.

Memory: peak_memory_bytes is the device memory in use after the steps minus that before the
model was made (torch.cuda.mem_get_info: the context is not counted, the caching allocator's
pool, cuBLAS/cuDNN workspaces and compiled kernels are), measured as barrierlm bench measures
its own; max_memory_allocated / max_memory_reserved are the allocator's own peaks.

--matmul-peak: the bf16 matrix-product rate for MFU, torch.matmul of two random 8192 x 8192
bf16 matrices; 3 warm-ups, then the median of 20 products timed with CUDA events.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blm_torch as bt  # noqa: E402

N_BATCHES = 4  # distinct random batches cycled, as barrierlm bench


def fail(msg):
    print(f"bench_torch: error: {msg}", file=sys.stderr)
    sys.exit(1)


# ------------------------------------------------------------------ the bf16 matmul peak
def matmul_peak(device, n=8192, warmup=3, repeats=20):
    """Median TFLOP/s of an n^3 bf16 product on random data (CUDA events per product)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    for _ in range(warmup):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    flops = 2.0 * n ** 3
    return {
        "tool": "bench_torch --matmul-peak",
        "n": n,
        "repeats": repeats,
        "peak_tflops": flops / statistics.median(times) / 1e12,
        "best_tflops": flops / min(times) / 1e12,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------ settings
def load_settings(path):
    """The settings of a `barrierlm bench` JSON (cmd/cmd_bench.cpp writes them)."""
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"--like {path}: {e}")
    need = ["model", "batch_size", "grad_accum", "lambda", "positions", "barrier_eps",
            "barrier_layers", "lr", "beta1", "beta2", "adam_eps", "weight_decay", "grad_clip"]
    missing = [k for k in need if k not in s]
    if missing:
        fail(f"--like {path}: missing {', '.join(missing)} (not a barrierlm bench JSON?)")
    return s


def make_model(s, device):
    m = s["model"]
    cfg = bt.ModelConfig(n_layer=m["n_layer"], n_head=m["n_head"], d_model=m["d_model"],
                         seq_len=m["seq_len"], vocab_size=m["vocab_size"])
    layers = [int(x) for x in s["barrier_layers"]]
    all_layers = layers == list(range(cfg.n_layer))
    bar = bt.BarrierConfig(lam=float(s["lambda"]), eps=float(s["barrier_eps"]),
                           layers=[] if all_layers else layers)
    model = bt.GPT(cfg, bar).to(device)
    init_gpt2(model, cfg)
    return model, cfg


def init_gpt2(model, cfg):
    """core/params.h's initialisation (values differ from barrierlm's, the distribution not)."""
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
    with torch.no_grad():
        for name in model.names:
            p = model.p(name)
            if name.endswith(".b"):
                p.zero_()
            elif name.startswith(("ln", "lnf")) or ".ln" in name:
                p.fill_(1.0)
            elif name.endswith(("attn.proj.w", "mlp.proj.w")):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, std)


def make_optimizer(model, s, fused):
    decay = [p for p in model.parameters() if p.dim() == 2]     # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() != 2]  # biases, LayerNorm
    groups = [{"params": decay, "weight_decay": float(s["weight_decay"])},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = {"lr": float(s["lr"]), "betas": (float(s["beta1"]), float(s["beta2"])),
          "eps": float(s["adam_eps"])}
    if fused:
        kw["fused"] = True
    return torch.optim.AdamW(groups, **kw)


def fp32_barrier(dets_fn):
    """dets_fn run in fp32 with autocast off (see the module docstring)."""
    def dets_fp32(q, k):
        with torch.autocast(device_type=q.device.type, enabled=False):
            return dets_fn(q.float(), k.float())
    return dets_fp32


def barrier_mask(B, T, K, device):
    """[B, T] bool, K distinct positions per row drawn uniformly from [2, T); None when K = 0
    or K covers every position (the exact barrier)."""
    if K <= 0 or K >= T - 2:
        return None
    order = torch.rand(B, T - 2, device=device).argsort(dim=1)[:, :K] + 2
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    return mask.scatter_(1, order, True)


# ------------------------------------------------------------------ the timed step
def memory_in_use(device):
    if device.type != "cuda":
        return -1
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(args, s, device):
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=device)  # creates the context before the memory baseline
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    mem0 = memory_in_use(device)
    model, cfg = make_model(s, device)
    bt.barrier_dets_fast = fp32_barrier(bt.barrier_dets_fast)  # forward() looks it up by name
    opt = make_optimizer(model, s, fused=args.fused)
    params = [p for p in model.parameters()]
    fwd = torch.compile(model) if args.compile else model
    B, T, V = int(s["batch_size"]), cfg.seq_len, cfg.vocab_size
    accum = int(s["grad_accum"])
    if B % accum:
        fail(f"batch_size {B} is not a multiple of grad_accum {accum}")
    Bm = B // accum
    K = int(s["positions"]) if float(s["lambda"]) != 0 else 0
    clip = float(s["grad_clip"])
    bf16 = args.precision == "bf16"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = [(torch.randint(0, V, (B, T), device=device, generator=gen),
                torch.randint(0, V, (B, T), device=device, generator=gen))
               for _ in range(N_BATCHES)]

    def step(i):
        x_all, y_all = batches[i % N_BATCHES]
        total, barrier = 0.0, 0.0
        for a in range(accum):
            x, y = x_all[a * Bm:(a + 1) * Bm], y_all[a * Bm:(a + 1) * Bm]
            mask = barrier_mask(Bm, T, K, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = fwd(x, y, barrier_mask=mask, fast_barrier=True, attn_impl=args.attn)
            loss = out["loss"] / accum
            loss.backward()
            total = total + loss.detach()
            barrier = barrier + out["barrier"].detach() / accum
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, barrier

    losses, barriers, times = [], [], []
    t_first = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mem_peak = -1
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, barrier = step(i)
        sync(device)
        dt = time.perf_counter() - t0
        if t_first is None:
            t_first = dt
        mem_peak = max(mem_peak, memory_in_use(device))
        if i >= args.warmup:
            times.append(dt)
            losses.append(float(loss))  # after the timing: these reads synchronise
            barriers.append(float(barrier))
    if not all(math.isfinite(v) for v in losses):
        fail(f"non-finite loss {losses} (the timings would mean nothing)")
    r = summarise(args, s, cfg, times, losses, t_first, mem0, mem_peak, device)
    if float(s["lambda"]) != 0:
        r["barrier"] = barriers
    return r


def summarise(args, s, cfg, times, losses, t_first, mem0, mem_peak, device):
    med = statistics.median(times)
    n_params = bt_param_count(cfg)
    tokens = int(s["batch_size"]) * cfg.seq_len
    flops_per_token = 6.0 * n_params + 6.0 * cfg.n_layer * cfg.d_model * cfg.seq_len
    r = {
        "tool": "bench_torch",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "compile": args.compile,
        "attn": args.attn,
        "fused_adamw": args.fused,
        "tf32": args.tf32,
        "model": s["model"],
        "batch_size": s["batch_size"],
        "grad_accum": s["grad_accum"],
        "lambda": s["lambda"],
        "positions": s["positions"],
        "warmup_steps": args.warmup,
        "steps": len(times),
        "first_step_s": t_first,
        "step_ms_median": med * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "step_ms_mean": statistics.mean(times) * 1e3,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / med,
        "params": n_params,
        "flops_per_token": flops_per_token,
        "tflops": flops_per_token * tokens / med / 1e12,
        "step_ms": [t * 1e3 for t in times],
        "loss": losses,
    }
    if device.type == "cuda":
        r["peak_memory_bytes"] = mem_peak - mem0
        r["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        r["max_memory_reserved"] = torch.cuda.max_memory_reserved(device)
    else:
        r["peak_memory_bytes"] = None
    return r


def bt_param_count(cfg):
    return sum(math.prod(shape) for _, shape in bt.param_layout(cfg))


def main():
    ap = argparse.ArgumentParser(description="PyTorch training-step timing for scripts/bench.sh")
    ap.add_argument("--like", help="a `barrierlm bench` JSON whose settings to use")
    ap.add_argument("--matmul-peak", action="store_true",
                    help="measure the bf16 8192^3 matmul rate instead")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1: compiles)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16 autocast with fp32 master weights (default), or plain fp32")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="eager mode (default: torch.compile)")
    ap.add_argument("--attn", choices=["sdpa", "manual"], default="sdpa",
                    help="F.scaled_dot_product_attention (default) or the spec's explicit form")
    ap.add_argument("--no-fused", dest="fused", action="store_false",
                    help="the default AdamW implementation instead of fused=True")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 matmuls")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="write the JSON result here (also printed)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("no GPU visible to PyTorch")
    if args.matmul_peak:
        if device.type != "cuda":
            fail("--matmul-peak needs a GPU")
        result = matmul_peak(device)
    else:
        if not args.like:
            fail("--like BLM_JSON is required (or --matmul-peak)")
        if args.steps < 1 or args.warmup < 0:
            fail("--steps must be >= 1 and --warmup >= 0")
        result = run_bench(args, load_settings(args.like), device)
    text = json.dumps(result, indent=1)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
