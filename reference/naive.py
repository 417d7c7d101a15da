"""Naive float64 NumPy oracles, derived independently of lowrank (docs/variants.md).

Everything is computed on host float64 copies of the inputs with plain loops and dicts, so
that no intermediate of lowrank's code path is reused.

* LoRA (docs/variants.md#lora): the dense forward and per-rank gradient sums,

      y = x W0ᵀ + b0 + s (x ⊙ mask) Aᵀ Bᵀ,   mask = inverted-dropout multiplier (0 or 1/(1-p))

* AdaLoRA's rank allocator (docs/variants.md#adalora-importance, PEFT ``RankAllocator``):
  importance, sensitivity EMAs, triplet scores, the cubic budget and the mask decision;
* IncreLoRA's module score and growth choice (docs/variants.md#increlora-score, the official
  ``SVDLinear.backward_hook`` and ``RankAllocator.increase_to_target_rank``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["lora_forward", "lora_grads", "optimal_residual_norm", "NaiveAdaLoraAllocator",
           "adalora_budget", "increlora_module_score", "NaiveIncreLoraScores",
           "increlora_choose"]


def _host64(a):
    if a is None:
        return None
    if hasattr(a, "get") and not isinstance(a, np.ndarray):   # cupy / strict arrays
        a = a.get()
    return np.array(a, dtype=np.float64)                        # always a fresh copy


def _flatten(x, n):
    """``(..., n) -> (N, n)`` plus the leading shape to restore."""
    x = _host64(x)
    return x.reshape(-1, n), x.shape[:-1]


def lora_forward(x, W0, b0, A, B, s, mask=None):
    """``y (..., m)``: the base path on x, the adapter on ``x ⊙ mask`` (mask=None: no dropout)."""
    W0, A, B = _host64(W0), _host64(A), _host64(B)
    m, n = W0.shape
    x2, lead = _flatten(x, n)
    xd = x2 if mask is None else x2 * _flatten(mask, n)[0]
    delta = float(s) * (B @ A)                       # dense ΔW (m, n)
    if mask is None:
        y = x2 @ (W0 + delta).T                      # one dense matmul, as the definition reads
    else:
        y = x2 @ W0.T + xd @ delta.T
    if b0 is not None:
        y = y + _host64(b0)[None, :]
    return y.reshape(*lead, m)


def lora_grads(x, W0, b0, A, B, s, G, mask=None):
    """Gradients of ``L = Σ y ⊙ G`` w.r.t. A, B, x and b0, from the scalar form

        y_ij = Σ_k x_ik W0_jk + b_j + s Σ_q B_jq Σ_k (x_ik mask_ik) A_qk

    ∂L/∂B_jq = s Σ_i G_ij u_iq                     with u_iq = Σ_k xd_ik A_qk
    ∂L/∂A_qk = s Σ_i (Σ_j G_ij B_jq) xd_ik
    ∂L/∂x_ik = Σ_j G_ij W0_jk + mask_ik s Σ_j G_ij Σ_q B_jq A_qk
    ∂L/∂b_j  = Σ_i G_ij

    Written as loops over the rank index q (r is small) with elementwise products and sums,
    never as lowrank's chain of matmuls. Returns a dict with dA, dB, dx (x's shape), db
    (None when b0 is None).
    """
    W0, A, B = _host64(W0), _host64(A), _host64(B)
    s = float(s)
    m, n = W0.shape
    r = A.shape[0]
    x2, lead = _flatten(x, n)
    G2 = _host64(G).reshape(-1, m)
    msk = np.ones_like(x2) if mask is None else _flatten(mask, n)[0]
    xd = x2 * msk
    N = x2.shape[0]

    dA = np.zeros((r, n))
    dB = np.zeros((m, r))
    dx_adapter = np.zeros((N, n))
    for q in range(r):
        u_q = (xd * A[q][None, :]).sum(axis=1)          # (N,)  u[:, q]
        g_q = (G2 * B[:, q][None, :]).sum(axis=1)       # (N,)  Σ_j G_ij B_jq
        dB[:, q] = s * (G2 * u_q[:, None]).sum(axis=0)
        dA[q] = s * (g_q[:, None] * xd).sum(axis=0)
        dx_adapter += s * g_q[:, None] * A[q][None, :]
    dx_base = (G2[:, :, None] * W0[None, :, :]).sum(axis=1)   # Σ_j G_ij W0_jk
    dx = dx_base + msk * dx_adapter
    db = None if b0 is None else G2.sum(axis=0)
    return {"dA": dA, "dB": dB, "dx": dx.reshape(*lead, n), "db": db}


def optimal_residual_norm(W, r):
    """``min_{rank ≤ r} ‖W − X‖_F = sqrt(Σ_{i>r} σ_i²)`` (Eckart–Young), σ from np.linalg.svd."""
    S = np.linalg.svd(_host64(W), compute_uv=False)
    return float(np.sqrt(np.sum(S[int(r):] ** 2)))


# --- AdaLoRA: importance, budget, mask (PEFT peft/tuners/adalora/layer.py RankAllocator) -------

def adalora_budget(t, b0, bT, tinit, tfinal, T, delta_t):
    """``(budget, mask now?)`` at 0-based step t, PEFT's ``budget_schedule`` line by line."""
    if t <= tinit:
        return b0, False
    if t > T - tfinal:
        return bT, True
    coeff = 1 - (t - tinit) / (T - tfinal - tinit)
    return int((b0 - bT) * coeff ** 3 + bT), t % delta_t == 0


class NaiveAdaLoraAllocator:
    """PEFT's ``AdaLoraModel.update_and_allocate`` over plain dicts of host arrays.

    ``modules``: ``[(name, init_r, target_r)]`` in model order. ``step(t, tensors)`` takes
    ``{name: {"A": (p, grad), "E": (p, grad), "B": (p, grad)}}`` — p the value after the
    optimizer step, grad the gradient that step used — and returns the rank pattern
    ``{name: [bool]}`` decided at step t, or None when this step does not mask.
    The E values to zero are the pattern's False entries.
    """

    def __init__(self, modules, tinit, tfinal, total_step, delta_t, beta1=0.85, beta2=0.85):
        self.names = [m[0] for m in modules]
        self.b0 = sum(m[1] for m in modules)
        self.bT = sum(m[2] for m in modules)
        self.tinit, self.tfinal, self.T, self.delta_t = tinit, tfinal, total_step, delta_t
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.ema_ipt, self.ema_unc = {}, {}
        self.final_pattern = None
        self.budget = self.b0

    def _update(self, tensors):
        for name in self.names:
            for key in ("A", "E", "B"):
                p, grad = (_host64(a) for a in tensors[name][key])
                ipt = np.abs(p * grad)                                 # I = |p ⊙ grad|
                k = (name, key)
                old_ipt = self.ema_ipt.get(k, np.zeros_like(p))
                old_unc = self.ema_unc.get(k, np.zeros_like(p))
                new_ipt = self.beta1 * old_ipt + (1 - self.beta1) * ipt
                self.ema_ipt[k] = new_ipt
                self.ema_unc[k] = self.beta2 * old_unc + (1 - self.beta2) * np.abs(ipt - new_ipt)

    def scores(self):
        """``{name: S (r,)}``, S_k = s(E)_k + mean_j s(A)[k, j] + mean_i s(B)[i, k]."""
        out = {}
        for name in self.names:
            s = {key: self.ema_ipt[(name, key)] * self.ema_unc[(name, key)]
                 for key in ("A", "E", "B")}
            r = s["E"].shape[0]
            out[name] = np.array([s["E"][k] + (np.mean(s["A"][k, :]) + np.mean(s["B"][:, k]))
                                  for k in range(r)])
        return out

    def _mask(self, budget):
        scores = self.scores()
        flat = sorted(v for name in self.names for v in scores[name])
        k = self.b0 - budget
        if k <= 0:
            return {name: [True] * len(scores[name]) for name in self.names}
        threshold = flat[k - 1]                                        # torch.kthvalue(k)
        return {name: [bool(v > threshold) for v in scores[name]] for name in self.names}

    def step(self, t, tensors):
        final_start = self.T - self.tfinal
        if t < final_start:
            self._update(tensors)
            self.budget, now = adalora_budget(t, self.b0, self.bT, self.tinit, self.tfinal,
                                              self.T, self.delta_t)
            return self._mask(self.budget) if now else None
        if t == final_start:
            self.budget = self.bT
            self.final_pattern = self._mask(self.bT)
            self.ema_ipt, self.ema_unc = {}, {}
            return self.final_pattern
        return self.final_pattern


# --- IncreLoRA: module score and growth (official loralib/increlora.py) ----------------------

def increlora_module_score(delta_W, grad_delta_W):
    """``Σ |ΔW ⊙ ∂L/∂ΔW| / √(m n)`` as one float (official ``SVDLinear.backward_hook``)."""
    delta_W, grad = _host64(delta_W), _host64(grad_delta_W)
    m, n = delta_W.shape
    total = 0.0
    for i in range(m):
        for j in range(n):
            total += abs(delta_W[i, j] * grad[i, j])
    return total / np.sqrt(m * n)


class NaiveIncreLoraScores:
    """The official ``RankAllocator.update_ipt`` / ``calculate_score`` on Python floats."""

    def __init__(self, names, beta1=0.85, beta2=0.85):
        self.names = list(names)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.ipt = {n: 0.0 for n in self.names}
        self.unc = {n: 0.0 for n in self.names}

    def update(self, scores):
        for n in self.names:
            s = float(scores[n])
            self.ipt[n] = self.beta1 * self.ipt[n] + (1 - self.beta1) * s
            self.unc[n] = self.beta2 * self.unc[n] + (1 - self.beta2) * abs(s - self.ipt[n])

    def importance(self):
        return {n: self.ipt[n] * self.unc[n] for n in self.names}


def increlora_choose(importance, names, top_h, remaining):
    """Modules that grow: those whose importance is >= the k-th largest, k = min(top_h,
    remaining) (official ``increase_to_target_rank``; ties at the threshold all grow)."""
    k = min(top_h, remaining)
    if k <= 0:
        return []
    threshold = sorted((importance[n] for n in names), reverse=True)[k - 1]
    return [n for n in names if importance[n] >= threshold]
