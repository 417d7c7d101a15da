"""LoRA (Hu et al., 2106.09685) and rsLoRA (Kalajdzievski, 2312.03732) — SPEC §2.1.

    y = x W0ᵀ + b0 + s · (x_d Aᵀ) Bᵀ,     s = α/r  (LoRA)  or  α/√r  (rsLoRA)

Backward, with G = dL/dy and u = x_d Aᵀ:
    dB = s Gᵀ u,   du = s G B,   dA = duᵀ x_d,   dx = G W0 + (du A) ⊙ mask
W0 is frozen, so ``Gᵀ x`` (the largest product of a full fine-tune) is never formed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .. import backend
from ..decompose import check_rank, svd_split
from ..module import Parameter
from ..ops.linear import linear_forward
from ._delta import lowrank_delta_backward, lowrank_delta_forward
from .base import AdaptedLinear, AdapterConfig, register

LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<q>", "olora", "milora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)$")


@dataclass
class LoraConfig(AdapterConfig):
    init: str = "kaiming"
    rslora: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("kaiming", "gaussian", "pissa", "olora", "milora") \
                and not _PISSA_NITER.match(str(self.init)):
            raise ValueError(f"init must be one of {LORA_INITS}, got {self.init!r}")

    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def lora_factors(W0, r: int, s: float, init: str, rng):
    """``(A (r, n), B (m, r), new_W0)``; new_W0 is W0 minus ``s·BA`` for the data-driven inits."""
    xp = backend.get_namespace(W0)
    m, n = W0.shape
    dtype = W0.dtype.name
    if init == "kaiming":   # PEFT: kaiming_uniform_(a=√5) == U(-1/√n, 1/√n)
        bound = 1.0 / math.sqrt(n)
        return backend.host_uniform(rng, (r, n), -bound, bound, dtype, xp), xp.zeros((m, r), dtype), W0
    if init == "gaussian":
        return backend.host_normal(rng, (r, n), 1.0 / r, dtype, xp), xp.zeros((m, r), dtype), W0
    if init == "olora":
        Q, R = backend.qr(W0)                           # (m, k), (k, n)
        B, A = Q[:, :r].copy(), R[:r].copy()
    else:  # pissa, pissa_niter_q, milora: the triplets split evenly between A and B
        niter = _PISSA_NITER.match(init)
        split = svd_split(W0, r, method="randomized" if niter else "exact",
                          n_iter=int(niter.group(1)) if niter else 0,
                          seed=int(rng.integers(2**31)), smallest=init == "milora")
        root = xp.sqrt(split.S / s)                     # (r,)
        A = root[:, None] * split.Vt                    # (r, n)
        B = split.U * root                              # (m, r)
    return A, B, W0 - s * (B @ A)


def lora_factor_grads(A, B, s: float, x2, dy2, u=None):
    """Accumulate ``dB = s Gᵀ u`` and ``dA = duᵀ x_d`` (trainable ones only); return
    ``du = s G B (N, r)`` for dx. ``x2 (N, n)`` is x_d flattened, ``dy2 (N, m)`` is G;
    ``u (N, r) = x_d Aᵀ`` is recomputed when the forward did not keep it."""
    if B.trainable:
        u2 = x2 @ A.data.T if u is None else u.reshape(-1, A.shape[0])  # (N, r)
        dB = dy2.T @ u2                                                  # (m, r)
        dB *= s
        B.accumulate(dB)
    du = dy2 @ B.data                                                    # (N, r)
    du *= s
    if A.trainable:
        A.accumulate(du.T @ x2)                                          # (r, n)
    return du


@register("lora", LoraConfig)
class LoraLinear(AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        if cfg.init not in ("kaiming", "gaussian") and not backend.is_finite(self.weight.data):
            raise ValueError(f"W0 contains NaN or Inf; init={cfg.init!r} needs a finite matrix")
        self.scaling = cfg.scaling()
        A, B, self.weight.data = lora_factors(self.weight.data, cfg.r, self.scaling, cfg.init, rng)
        self.lora_A = Parameter(A)   # (r, n), "lora_A.weight"
        self.lora_B = Parameter(B)   # (m, r), "lora_B.weight"

    def adapter_forward(self, x, dropout_mask):
        x_d, mask = self.dropout(x, dropout_mask)
        if mask is None:
            # Without dropout x_d = x, so y = x (W0 + sBA)ᵀ + b0: forming the effective weight
            # costs m·n·r, against N·(m+n)·r and two extra passes over y for the two-step path.
            W_eff = self.effective_weight()                              # (m, n)
            y, _ = linear_forward(x, W_eff, self._bias_data())           # (..., m)
            return y, (x, None, None, W_eff)
        y, _ = linear_forward(x, self.weight.data, self._bias_data())   # (..., m)
        u = x_d.reshape(-1, self.in_features) @ self.lora_A.data.T       # (N, r)
        y += (self.scaling * (u @ self.lora_B.data.T)).reshape(y.shape)  # (..., m)
        return y, (x_d, mask, u, None)

    def adapter_backward(self, dy, cache):
        x_d, mask, u, W_eff = cache
        A = self.lora_A
        x2 = x_d.reshape(-1, A.shape[1])                                 # (N, n)
        dy2 = dy.reshape(-1, self.out_features)                          # (N, m)
        du = lora_factor_grads(A, self.lora_B, self.scaling, x2, dy2, u)
        if not self.need_input_grad:
            return None
        if W_eff is not None:   # G (W0 + sBA) = G W0 + du A
            return (dy2 @ W_eff).reshape(x_d.shape)                      # (..., n)
        dx = (dy2 @ self.weight.data).reshape(x_d.shape)                 # (..., n)
        dx_adapter = (du @ A.data).reshape(dx.shape)                     # (..., n) from (N, n)
        dx_adapter *= mask
        dx += dx_adapter
        return dx

    def effective_weight(self):
        """``W0 + s·BA`` (m, n), the weight the unmerged layer applies without dropout."""
        W_eff = (self.scaling * self.lora_B.data) @ self.lora_A.data    # (m, n); s on (m, r)
        W_eff += self.weight.data
        return W_eff

    def delta_weight(self):
        return self.scaling * (self.lora_B.data @ self.lora_A.data)     # (m, n)

    # --- multi-adapter fast path (lowrank.parallel.multi; formulas in adapters/_delta.py) ------
    def delta_forward(self, x, dropout_mask):
        """``(Δy, cache)`` with ``adapter_forward(x) = x W0ᵀ + b0 + Δy``; valid while W0 is the
        base the caller shares (kaiming/gaussian inits; not after a merge or a ReLoRA restart)."""
        return lowrank_delta_forward(self, x, dropout_mask, self.lora_A.data, self.lora_B.data,
                                     self.scaling)

    def delta_backward(self, dy, cache):
        """Accumulate A's and B's gradients; return dx minus ``dy W0`` (the caller's part)."""
        dA, _, dx = lowrank_delta_backward(dy, cache, self.lora_B, need_dP=self.lora_A.trainable)
        if dA is not None:
            self.lora_A.accumulate(dA)
        return dx
