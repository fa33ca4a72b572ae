#!/usr/bin/env python3
"""Times PyTorch autograd of the barrier alone, for docs/PERFORMANCE.md's comparison with
barrierlm's CUDA kernels: R = mean over (b, h, t >= 2) of phi(det J_t), det J_t from
blm_torch.barrier_dets_fast (the S_t = pi @ vec(q k^T) form, one [T, T] x [T, dh^2] matmul per
(b, h), then batched LU determinants), q, k random N(0, scale^2), in fp32 (or --dtype) on the GPU.

    python3 scripts/py/bench_barrier.py --shape 8,12,1024,64 [--repeats 20] [--impl fast|literal]

Timing: CUDA events around each repeat (after --warmup untimed ones), median over --repeats;
forward alone (under no_grad) and forward + backward (R.backward() into q.grad, k.grad).

Work counted (the spec's exact barrier, section 7; lower-order terms not counted):
  W = B * H * T * (T - 1) / 2 * dh^2 multiply-adds, the forward's S_t = sum_{s<t} pi_ts q_s k_s^T
  forward:            W multiply-adds  -> 2 W FLOPs
  forward + backward: 3 W multiply-adds -> 6 W FLOPs (the backward's two dh x dh products per
                      (t, s): u_ts = G_t (k_s - kbar_t) and w_ts = G_t^T (q_s - qbar_t))
Not counted: the O(T^2 dh) logits and softmax, the O(T dh^3) determinants and inverses.  The
same counts applied to any implementation give comparable rates: "counted FLOP/s" is useful
work per second (PyTorch's fast form multiplies the full T x T matrix, zeros above the diagonal
included, so it executes about twice the counted forward work).
"""
import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blm_torch as bt  # noqa: E402


def parse_shape(text):
    try:
        B, H, T, dh = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape '{text}': expected B,H,T,dh (four integers)")
    if min(B, H, T, dh) < 1 or T < 3:
        raise argparse.ArgumentTypeError(f"--shape '{text}': need positive sizes and T >= 3")
    return B, H, T, dh


def counted_work(B, H, T, dh):
    """W, the forward's multiply-adds (see the module docstring)."""
    return B * H * T * (T - 1) // 2 * dh * dh


def barrier_objective(q, k, eps, impl):
    dets = (bt.barrier_dets_fast if impl == "fast" else bt.barrier_dets)(q, k)
    return bt.phi(dets[..., 2:], eps).mean()


def time_ms(fn, warmup, repeats):
    """Median milliseconds of fn() over repeats, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser(description="PyTorch autograd timing of the barrier alone")
    ap.add_argument("--shape", type=parse_shape, default=(8, 12, 1024, 64), help="B,H,T,dh (default 8,12,1024,64)")
    ap.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32")
    ap.add_argument("--impl", choices=["fast", "literal"], default="fast")
    ap.add_argument("--scale", type=float, default=0.5, help="std of q and k entries (default 0.5)")
    ap.add_argument("--eps", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_barrier: error: no GPU visible to PyTorch", file=sys.stderr)
        return 2
    B, H, T, dh = args.shape
    dtype = torch.float32 if args.dtype == "fp32" else torch.float64
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    q = (torch.randn(B, H, T, dh, generator=gen, device="cuda", dtype=dtype) * args.scale).requires_grad_(True)
    k = (torch.randn(B, H, T, dh, generator=gen, device="cuda", dtype=dtype) * args.scale).requires_grad_(True)

    def forward():
        with torch.no_grad():
            return barrier_objective(q, k, args.eps, args.impl)

    def forward_backward():
        q.grad = k.grad = None
        barrier_objective(q, k, args.eps, args.impl).backward()

    R = float(forward())
    if not math.isfinite(R):
        print(f"bench_barrier: error: R = {R} (lower --scale)", file=sys.stderr)
        return 1
    torch.cuda.reset_peak_memory_stats()
    f_med, f_min, f_max = time_ms(forward, args.warmup, args.repeats)
    fb_med, fb_min, fb_max = time_ms(forward_backward, args.warmup, args.repeats)
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    W = counted_work(B, H, T, dh)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}, impl {args.impl}")
    print(f"shape B={B} H={H} T={T} dh={dh}; R = {R:.6g}; peak memory {peak_gib:.2f} GiB")
    print(f"counted work W = B*H*T*(T-1)/2*dh^2 = {W:.4g} multiply-adds; "
          f"forward 2W = {2 * W:.4g} FLOPs, forward+backward 6W = {6 * W:.4g} FLOPs")
    print(f"forward           median {f_med:9.3f} ms  (min {f_min:.3f}, max {f_max:.3f})  "
          f"{2 * W / (f_med * 1e-3) / 1e12:8.2f} TFLOP/s counted")
    print(f"forward+backward  median {fb_med:9.3f} ms  (min {fb_min:.3f}, max {fb_max:.3f})  "
          f"{6 * W / (fb_med * 1e-3) / 1e12:8.2f} TFLOP/s counted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
