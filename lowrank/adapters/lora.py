"""LoRA (Hu et al., 2106.09685) and rsLoRA (Kalajdzievski, 2312.03732) — docs/variants.md#lora.

    y = x W0ᵀ + b0 + s · (x_d Aᵀ) Bᵀ,     s = α/r  (LoRA)  or  α/√r  (rsLoRA)

Backward, with G = dL/dy and u = x_d Aᵀ (the low-rank product with P = A, in _lowrank.py):
    dB = s Gᵀ u,   du = s G B,   dA = duᵀ x_d,   dx = G W0 + (du A) ⊙ mask
W0 is frozen, so ``Gᵀ x`` (the largest product of a full fine-tune) is never formed.

``pissa_niter_<q>`` is PEFT's ``torch.svd_lowrank(W, r, niter=q)``: a sketch of exactly r
columns (no oversampling), torch's orientation (it sketches Wᵀ when m < n); the Gaussian test
matrix comes from the layer's host stream (``svd_lowrank`` accepts it, so a test can feed
torch's). ``pissa_oversample`` > 0 widens the sketch to r + oversample columns (lowrank's
earlier default, 10: closer to the exact PiSSA factors) — docs/variants.md#pissa-niter-q.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .. import backend
from ..nn.decompose import check_rank, svd_split
from ..nn.module import Parameter
from ._lowrank import LowRankMap, LowRankParts
from .base import AdaptedLinear, AdapterConfig, check_int, register

LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<q>", "olora", "milora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)$")


@dataclass
class LoraConfig(AdapterConfig):
    init: str = "kaiming"
    rslora: bool = False
    pissa_oversample: int = 0    # pissa_niter_q sketch: r + this columns (PEFT: 0)

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("kaiming", "gaussian", "pissa", "olora", "milora") \
                and not _PISSA_NITER.match(str(self.init)):
            raise ValueError(f"init must be one of {LORA_INITS}, got {self.init!r}")
        check_int("pissa_oversample", self.pissa_oversample, 0)

    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def svd_lowrank(W, q: int, niter: int, omega):
    """``(U (m, q), S (q,), V (n, q))`` as ``torch.svd_lowrank(W, q, niter)`` computes them,
    with its Gaussian test matrix ``omega`` given: (n, q) for m >= n, else (m, q) (torch
    sketches ``Wᵀ`` when m < n and swaps U and V back)."""
    m, n = W.shape
    M = W if m >= n else W.T                                            # (m', n')
    Q, _ = backend.qr(M @ omega)                                        # (m', q)
    for _ in range(niter):
        Q, _ = backend.qr(M.T @ Q)                                      # (n', q)
        Q, _ = backend.qr(M @ Q)                                        # (m', q)
    U_small, S, Vt = backend.svd(Q.T @ M)                               # (q, q), (q,), (q, n')
    U, V = Q @ U_small, Vt.T                                            # (m', q), (n', q)
    return (U, S, V) if m >= n else (V, S, U)


def lora_factors(W0, r: int, s: float, init: str, rng, oversample: int = 0):
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
        if niter and oversample == 0:   # PEFT: torch.svd_lowrank(W, r, niter)
            omega = backend.host_normal(rng, (min(m, n), r), 1.0, dtype, xp)   # (n', r)
            U, S, V = svd_lowrank(W0, r, int(niter.group(1)), omega)
            Vt = V.T                                    # (r, n)
        else:
            split = svd_split(W0, r, method="randomized" if niter else "exact",
                              oversample=oversample, n_iter=int(niter.group(1)) if niter else 0,
                              seed=int(rng.integers(2**31)), smallest=init == "milora")
            U, S, Vt = split.U, split.S, split.Vt
        root = xp.sqrt(S / s)                           # (r,)
        A = root[:, None] * Vt                          # (r, n)
        B = U * root                                    # (m, r)
    return A, B, W0 - s * (B @ A)


@register("lora", LoraConfig)
class LoraLinear(LowRankMap, AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        if cfg.init not in ("kaiming", "gaussian") and not backend.is_finite(self.weight.data):
            raise ValueError(f"W0 contains NaN or Inf; init={cfg.init!r} needs a finite matrix")
        self.scaling = cfg.scaling()
        A, B, self.weight.data = lora_factors(self.weight.data, cfg.r, self.scaling, cfg.init, rng,
                                              cfg.pissa_oversample)
        self.lora_A = Parameter(A)   # (r, n), "lora_A.weight"
        self.lora_B = Parameter(B)   # (m, r), "lora_B.weight"

    # --- the map: docs/variants.md#lora, the product in _lowrank.py ------------------------------
    def lowrank_parts(self) -> LowRankParts:
        return LowRankParts(self.lora_A.data, self.lora_B, self.scaling,
                            need_dP=self.lora_A.trainable)

    def accumulate_lowrank(self, dA, dg) -> None:
        self.lora_A.accumulate(dA)                                       # (r, n)
