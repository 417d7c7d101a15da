"""Naive float64 NumPy oracles for LoRA (SPEC §2.1), derived independently of lowrank.

Everything is computed on host float64 copies of the inputs, through the dense effective
weight for the forward and through explicit per-rank / per-element sums for the gradients, so
that no intermediate of lowrank's factored code path is reused.

    y = x W0ᵀ + b0 + s (x ⊙ mask) Aᵀ Bᵀ,   mask = inverted-dropout multiplier (0 or 1/(1-p))
"""
from __future__ import annotations

import numpy as np

__all__ = ["lora_forward", "lora_grads", "optimal_residual_norm"]


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
