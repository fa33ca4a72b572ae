"""barrierlm's model in PyTorch: the independent peer for cross-checks and benchmarks.

The same GPT-2 model as core/reference.h (pre-LN, learned positions, tied embeddings, GELU-tanh,
biases, LayerNorm eps 1e-5) and the same barrier objective as the spec
(/work/shared/docs/barrier-spec.md, sections 1-3), written with autograd so that nothing of
barrierlm's hand-written backward is reused.  Parameters use barrierlm's flat layout
(core/params.h), so a checkpoint's tensors load by position and name.

    model = GPT(cfg, BarrierConfig(lam=0.05, eps=1e-4)).to(device, torch.float64)
    model.load_flat(params)                # params: 1-D tensor in barrierlm's layout
    terms = model(x, y, want_barrier=True)  # x, y: [B, T] int64
    terms["loss"].backward(); g = model.flat_grad()

Shapes: q, k [B, H, T, dh]; dets [B, H, T]; logits [B, T, V].
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LAYERNORM_EPS = 1e-5  # as core/ops_cpu.h (kLayerNormEps) and torch's default


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128
    vocab_size: int = 256


@dataclass
class BarrierConfig:
    lam: float = 0.0
    eps: float = 1e-4
    layers: list = field(default_factory=list)  # empty: all

    def applies_to(self, layer):
        return not self.layers or layer in self.layers


def param_layout(cfg):
    """[(name, shape)] in barrierlm's order (core/params.cpp); offsets are running sums."""
    V, T, d = cfg.vocab_size, cfg.seq_len, cfg.d_model
    out = [("wte", (V, d)), ("wpe", (T, d))]
    for l in range(cfg.n_layer):
        p = f"h{l}."
        out += [(p + "ln1.w", (d,)), (p + "ln1.b", (d,)),
                (p + "attn.qkv.w", (3 * d, d)), (p + "attn.qkv.b", (3 * d,)),
                (p + "attn.proj.w", (d, d)), (p + "attn.proj.b", (d,)),
                (p + "ln2.w", (d,)), (p + "ln2.b", (d,)),
                (p + "mlp.fc.w", (4 * d, d)), (p + "mlp.fc.b", (4 * d,)),
                (p + "mlp.proj.w", (d, 4 * d)), (p + "mlp.proj.b", (d,))]
    out += [("lnf.w", (d,)), ("lnf.b", (d,))]
    return out


def phi(x, eps):
    """The smooth log-barrier (spec section 3): -log x for x >= eps, its quadratic extension below.

    The log branch sees max(x, eps), so the branch torch.where discards is finite and its
    (zero-weighted) gradient cannot turn into NaN."""
    xe = torch.clamp(x, min=eps)
    quad = -math.log(eps) - (x - eps) / eps + (x - eps) ** 2 / (2 * eps * eps)
    return torch.where(x >= eps, -torch.log(xe), quad)


def strict_attention(q, k):
    """pi [B, H, T, T]: pi_ts = softmax_{s<t}(q_t . k_s / sqrt(dh)); rows t < 2 are all zero.

    Row t = 1 has one predecessor, but the spec fixes C_1 = 0 (J_1 = I), and with one s the
    centred outer product is zero anyway; zeroing the row keeps qbar, kbar of t < 2 at 0."""
    T, dh = q.shape[-2], q.shape[-1]
    z = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)
    strict = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)
    z = z.masked_fill(~strict, float("-inf"))
    has_pred = (torch.arange(T, device=q.device) >= 2)[:, None]  # [T, 1]
    # Rows t < 2 would be all -inf (softmax NaN): give them zeros, then drop them.
    z = torch.where(has_pred, z, torch.zeros_like(z))
    return torch.softmax(z, dim=-1) * has_pred


def barrier_dets(q, k):
    """det J_t, literally (spec section 2): q, k [B, H, T, dh] -> [B, H, T] (1 for t < 2).

    C_t = (1/sqrt(dh)) sum_{s<t} pi_ts (q_s - qbar_t)(k_s - kbar_t)^T; J_t = I - C_t.
    Memory B*H*T*T*dh: for small shapes (tests, cross-checks)."""
    dh = q.shape[-1]
    pi = strict_attention(q, k)
    qbar = pi @ q                              # [B, H, T, dh]
    kbar = pi @ k
    dq = q.unsqueeze(2) - qbar.unsqueeze(3)    # [B, H, t, s, dh] = q_s - qbar_t
    dk = k.unsqueeze(2) - kbar.unsqueeze(3)
    C = torch.einsum("bhts,bhtsi,bhtsj->bhtij", pi, dq, dk) / math.sqrt(dh)
    J = torch.eye(dh, dtype=q.dtype, device=q.device) - C
    return torch.linalg.det(J)


def barrier_dets_fast(q, k):
    """The same as barrier_dets via S_t = sum_s pi_ts q_s k_s^T (one [T, T] x [T, dh^2] matmul):
    C_t = (S_t - qbar_t kbar_t^T) / sqrt(dh), since sum_s pi_ts = 1 for t >= 2 (and C_t = 0
    for t < 2, whose pi rows are zero).  Memory B*H*T*dh^2.  Uncentred: in fp32 a large common
    component of q and k loses digits to cancellation (fine for timing, not for references)."""
    B, H, T, dh = q.shape
    pi = strict_attention(q, k)
    qbar = pi @ q
    kbar = pi @ k
    P = (q.unsqueeze(-1) * k.unsqueeze(-2)).reshape(B, H, T, dh * dh)  # vec(q_s k_s^T)
    S = (pi @ P).reshape(B, H, T, dh, dh)
    C = (S - qbar.unsqueeze(-1) * kbar.unsqueeze(-2)) / math.sqrt(dh)
    J = torch.eye(dh, dtype=q.dtype, device=q.device) - C
    return torch.linalg.det(J)


class GPT(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, barrier: BarrierConfig = None):
        super().__init__()
        self.cfg = cfg
        self.barrier = barrier or BarrierConfig()
        self.names = []
        for name, shape in param_layout(cfg):
            self.names.append(name)
            self.register_parameter(name.replace(".", "_"), torch.nn.Parameter(torch.zeros(shape)))

    def p(self, name):
        return getattr(self, name.replace(".", "_"))

    def load_flat(self, flat):
        """Copies a 1-D tensor in barrierlm's layout into the parameters (any dtype/device)."""
        total = sum(self.p(n).numel() for n in self.names)
        if flat.dim() != 1 or flat.numel() != total:
            raise ValueError(f"parameter buffer has shape {tuple(flat.shape)}, the layout {total} values")
        off = 0
        with torch.no_grad():
            for name in self.names:
                t = self.p(name)
                t.copy_(flat[off:off + t.numel()].view(t.shape))
                off += t.numel()

    def flat_grad(self):
        """The gradient in barrierlm's layout (zeros for a tensor autograd did not reach)."""
        parts = []
        for n in self.names:
            t = self.p(n)
            parts.append((t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1))
        return torch.cat(parts)

    def _attention(self, q, k, v, impl):
        if impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # The spec's definition: softmax over s <= t of q_t . k_s / sqrt(dh).
        T, dh = q.shape[-2], q.shape[-1]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        return att @ v

    def forward(self, x, targets=None, barrier_mask=None, want_barrier=None, noise=None,
                fast_barrier=False, attn_impl="manual"):
        """x, targets [B, T] int64.  Without targets: logits [B, T, V].  With targets: a dict
        loss = ce + lam * barrier (the barrier term only when lam != 0), ce, barrier (R, the mean
        of phi over batch x barrier layers x heads x counted positions; 0 when none), n_R, and
        min_logdet (smallest log det J_t counted, -inf if a det <= 0, None when none counted).
        want_barrier (default: lam != 0) computes R also at lam = 0, for reporting.
        barrier_mask [B, T]: positions t >= 2 count only where it is nonzero."""
        cfg = self.cfg
        B, T = x.shape
        d, H = cfg.d_model, cfg.n_head
        dh = d // H
        h = self.p("wte")[x] + self.p("wpe")[:T]
        if noise is not None:
            h = h + noise
        lam = self.barrier.lam
        want_barrier = (lam != 0) if want_barrier is None else want_barrier
        phi_sum, n_R, min_logdet = h.new_zeros(()), 0, None
        dets_fn = barrier_dets_fast if fast_barrier else barrier_dets
        counted = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        counted[:, 2:] = True
        if barrier_mask is not None:
            counted &= barrier_mask.bool()
        for l in range(cfg.n_layer):
            pre = f"h{l}."
            y = F.layer_norm(h, (d,), self.p(pre + "ln1.w"), self.p(pre + "ln1.b"), LAYERNORM_EPS)
            qkv = F.linear(y, self.p(pre + "attn.qkv.w"), self.p(pre + "attn.qkv.b"))
            q, k, v = (t.reshape(B, T, H, dh).transpose(1, 2) for t in qkv.split(d, dim=-1))
            a = self._attention(q, k, v, attn_impl)
            if want_barrier and self.barrier.applies_to(l) and bool(counted.any()):
                dets = dets_fn(q, k)  # [B, H, T]
                c = counted[:, None, :].expand(B, H, T)
                phi_sum = phi_sum + torch.where(c, phi(dets, self.barrier.eps), 0.0).sum()
                n_R += int(c.sum())
                with torch.no_grad():
                    logdet = torch.where(dets > 0, torch.log(dets.clamp(min=1e-300)),
                                         torch.full_like(dets, float("-inf")))
                    smallest = float(logdet[c].min())
                    min_logdet = smallest if min_logdet is None else min(min_logdet, smallest)
            a = a.transpose(1, 2).reshape(B, T, d)
            h = h + F.linear(a, self.p(pre + "attn.proj.w"), self.p(pre + "attn.proj.b"))
            y = F.layer_norm(h, (d,), self.p(pre + "ln2.w"), self.p(pre + "ln2.b"), LAYERNORM_EPS)
            hidden = F.gelu(F.linear(y, self.p(pre + "mlp.fc.w"), self.p(pre + "mlp.fc.b")),
                            approximate="tanh")
            h = h + F.linear(hidden, self.p(pre + "mlp.proj.w"), self.p(pre + "mlp.proj.b"))
        h = F.layer_norm(h, (d,), self.p("lnf.w"), self.p("lnf.b"), LAYERNORM_EPS)
        logits = h @ self.p("wte").t()  # tied output projection
        if targets is None:
            return logits
        # Mean over every target, in the model's dtype (float64 stays float64).
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        R = phi_sum / max(n_R, 1)
        # lam = 0 adds no term at all: 0 * R would still back-propagate 0 * inf = NaN where R
        # has an infinite gradient.
        loss = ce + lam * R if lam != 0 else ce
        return {"loss": loss, "ce": ce, "barrier": R, "n_R": n_R, "min_logdet": min_logdet}
