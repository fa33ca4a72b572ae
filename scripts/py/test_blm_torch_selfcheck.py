#!/usr/bin/env python3
"""Self-check of scripts/py/blm_torch.py, the PyTorch peer the cross-check trusts (float64):

  1. barrier_dets (literal) == barrier_dets_fast (S_t form)             rel. 1e-12
  2. barrier_dets == a per-position loop written from the spec's sums   rel. 1e-12
  3. det J_t == det of the generator's Jacobian d eps_t / d y_t, taken by autograd from
     eps_t = y_t - sum_{s<t} pi_ts(y) y_s (spec section 2, before Sylvester's identity)  1e-10
  4. torch.autograd.gradcheck of sum phi(det J_t) over t >= 2, both forms, on the log branch, the
     quadratic branch and a mix of both
  5. phi is C^2 at eps (values and two derivatives from both sides)     rel. 1e-6
  6. the whole GPT: manual attention == sdpa; a central finite difference of
     CE + lambda R along a random direction == the autograd gradient    rel. 1e-6

    python3 scripts/py/test_blm_torch_selfcheck.py [--device cuda|cpu]

Exit status 0 when every check passes, 1 otherwise.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blm_torch as bt  # noqa: E402

F64 = torch.float64
results = []


def report(name, ok, detail):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def random_qk(gen, shape, scale, device):
    q = torch.randn(*shape, generator=gen, dtype=F64) * scale
    k = torch.randn(*shape, generator=gen, dtype=F64) * scale
    return q.to(device), k.to(device)


def dets_by_loops(q, k):
    """det J_t from the spec's sums, one (b, h, t) at a time: [B, H, T]."""
    B, H, T, dh = q.shape
    out = torch.ones(B, H, T, dtype=q.dtype, device=q.device)
    for b in range(B):
        for h in range(H):
            for t in range(2, T):
                z = torch.stack([q[b, h, t] @ k[b, h, s] for s in range(t)]) / math.sqrt(dh)
                pi = torch.exp(z - z.max())
                pi = pi / pi.sum()
                qbar = sum(pi[s] * q[b, h, s] for s in range(t))
                kbar = sum(pi[s] * k[b, h, s] for s in range(t))
                C = sum(pi[s] * torch.outer(q[b, h, s] - qbar, k[b, h, s] - kbar) for s in range(t))
                out[b, h, t] = torch.linalg.det(torch.eye(dh, dtype=q.dtype, device=q.device) - C / math.sqrt(dh))
    return out


def check_dets(gen, device):
    q, k = random_qk(gen, (2, 3, 11, 5), 0.7, device)
    lit, fast, loops = bt.barrier_dets(q, k), bt.barrier_dets_fast(q, k), dets_by_loops(q, k)
    spread = f"dets in [{float(lit[..., 2:].min()):.3f}, {float(lit[..., 2:].max()):.3f}]"
    e = rel_err(fast, lit)
    report("barrier_dets == barrier_dets_fast", e <= 1e-12, f"max rel. diff {e:.1e}; {spread}")
    e = rel_err(lit, loops)
    first = bool((lit[..., :2] == 1).all())
    report("barrier_dets == spec loops", e <= 1e-12 and first,
           f"max rel. diff {e:.1e}; det J_0 = det J_1 = 1: {first}")


def check_generator_jacobian(gen, device):
    """Spec section 2: det(d eps_t / d y_t) = det(I - C_t), one head, d = 7, dh = 3."""
    T, d, dh = 9, 7, 3
    y = (torch.randn(T, d, generator=gen, dtype=F64)).to(device)
    WQ, WK = (torch.randn(dh, d, generator=gen, dtype=F64) * 0.6).to(device), (torch.randn(dh, d, generator=gen, dtype=F64) * 0.6).to(device)
    bQ, bK = (torch.randn(dh, generator=gen, dtype=F64) * 0.3).to(device), (torch.randn(dh, generator=gen, dtype=F64) * 0.3).to(device)
    q, k = y @ WQ.T + bQ, y @ WK.T + bK
    dets = bt.barrier_dets(q[None, None], k[None, None])[0, 0]
    worst = 0.0
    for t in range(2, T):
        def eps_t(yt):
            qt = WQ @ yt + bQ
            pi = torch.softmax((k[:t] @ qt) / math.sqrt(dh), dim=0)
            return yt - pi @ y[:t]
        Jy = torch.autograd.functional.jacobian(eps_t, y[t])  # [d, d]
        worst = max(worst, abs(float(torch.linalg.det(Jy) - dets[t])) / abs(float(dets[t])))
    report("det J_t == det(d eps_t / d y_t) (generator Jacobian)", worst <= 1e-10,
           f"max rel. diff {worst:.1e} over t = 2..{T - 1}")


def barrier_sum(fn, eps):
    return lambda q, k: bt.phi(fn(q, k), eps)[..., 2:].sum()


def check_gradcheck(gen, device):
    q, k = random_qk(gen, (1, 2, 6, 3), 0.8, device)
    dets = bt.barrier_dets(q, k)[..., 2:].flatten().sort().values
    mid = float(dets[len(dets) // 2 - 1] + dets[len(dets) // 2]) / 2  # between two dets
    cases = [("log branch", 1e-4), ("quadratic branch", float(dets.max()) + 0.5), ("both branches", mid)]
    for fn_name, fn in (("literal", bt.barrier_dets), ("fast", bt.barrier_dets_fast)):
        for case, eps in cases:
            below = int((dets < eps).sum())
            qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
            try:
                ok = torch.autograd.gradcheck(barrier_sum(fn, eps), (qq, kk), eps=1e-6, atol=1e-6, rtol=1e-5)
                detail = ""
            except RuntimeError as e:  # gradcheck raises GradcheckError, a RuntimeError
                ok, detail = False, " " + str(e).splitlines()[0]
            report(f"gradcheck sum phi(det J_t), {fn_name}, {case}", ok,
                   f"eps {eps:.4g}, {below}/{len(dets)} dets below eps{detail}")


def check_phi_c2(device):
    eps = 1e-2
    worst = 0.0
    for side in (-1e-9, 1e-9):
        x = torch.tensor(eps + side, dtype=F64, device=device, requires_grad=True)
        y = bt.phi(x, eps)
        (d1,) = torch.autograd.grad(y, x, create_graph=True)
        (d2,) = torch.autograd.grad(d1, x)
        exact = (-math.log(eps), -1 / eps, 1 / eps ** 2)
        for got, want in zip((float(y), float(d1), float(d2)), exact):
            worst = max(worst, abs(got - want) / abs(want))
    report("phi is C^2 at eps", worst <= 1e-6, f"max rel. diff of phi, phi', phi'' {worst:.1e}")


def tiny_model(gen, device, lam):
    cfg = bt.ModelConfig(n_layer=2, n_head=2, d_model=8, seq_len=10, vocab_size=13)
    model = bt.GPT(cfg, bt.BarrierConfig(lam=lam, eps=1e-4)).to(device=device, dtype=F64)
    total = sum(math.prod(s) for _, s in bt.param_layout(cfg))
    flat = torch.randn(total, generator=gen, dtype=F64) * 0.4  # large: det J_t far from 1
    model.load_flat(flat.to(device))
    x = torch.randint(0, cfg.vocab_size, (3, 9), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab_size, (3, 9), generator=gen).to(device)
    return model, flat.to(device), x, y


def check_model(gen, device):
    model, flat, x, y = tiny_model(gen, device, lam=1.0)
    e = rel_err(model(x, attn_impl="sdpa"), model(x, attn_impl="manual"))
    report("GPT: manual attention == sdpa", e <= 1e-12, f"max rel. diff of logits {e:.1e}")

    terms = model(x, y)
    # How much of the gradient is the barrier's (lambda = 1): the check below must cover it.
    parts = torch.autograd.grad(terms["barrier"], [model.p(n) for n in model.names],
                                retain_graph=True, allow_unused=True)
    barrier_norm = math.sqrt(sum(float((g_ * g_).sum()) for g_ in parts if g_ is not None))
    terms["loss"].backward()
    g = model.flat_grad()
    share = barrier_norm / float(g.norm())
    # A random unit vector plus the gradient's direction, so g.v is not accidentally ~0.
    direction = torch.randn(flat.numel(), generator=gen, dtype=F64).to(device)
    direction = direction / direction.norm() + g / g.norm()
    direction /= direction.norm()
    h = 1e-5

    def loss_at(p):
        model.load_flat(p)
        with torch.no_grad():
            return float(model(x, y)["loss"])

    fd = (loss_at(flat + h * direction) - loss_at(flat - h * direction)) / (2 * h)
    exact = float(g @ direction)
    e = abs(fd - exact) / abs(exact)
    ok = e <= 1e-6 and terms["n_R"] == 2 * 2 * 3 * 7 and share > 0.05
    report("GPT: finite difference of CE + lambda R == autograd", ok,
           f"fd {fd:.10g}, g.v {exact:.10g}, rel. diff {e:.1e}; R {float(terms['barrier']):.4g} "
           f"over N_R {terms['n_R']} terms, min log det {terms['min_logdet']:.3g}, barrier share "
           f"of the gradient {share:.2f} (> 0.05)")


def main():
    ap = argparse.ArgumentParser(description="self-check of blm_torch.py (float64)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(ap.parse_args().device)
    print(f"torch {torch.__version__} on {device}")
    gen = torch.Generator().manual_seed(20260522)
    check_dets(gen, device)
    check_generator_jacobian(gen, device)
    check_gradcheck(gen, device)
    check_phi_c2(device)
    check_model(gen, device)
    failed = results.count(False)
    print(f"\n{len(results) - failed}/{len(results)} checks passed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
