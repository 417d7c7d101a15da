"""svd — the seed's own form (docs/variants.md#svd): train the top-r SVD triplets of W0 in place.

    W0 = W_h + U diag(σ) Vᵀ      (lowrank.nn.decompose.svd_split: exact or randomized, top r)

W_h (the residual) becomes the frozen base ``self.weight``; ``U (m, r)``, ``σ (r,)`` and
``V (n, r)`` are Parameters, and any non-empty subset of them trains (``train=("U", "S")`` is
the seed's method; the default trains all three). V is stored (n, r) so that ``p = x V``.

    p = x_d V (N, r),     y = x W_hᵀ + b0 + (p ⊙ σ) Uᵀ

Backward (the low-rank product of _lowrank.py with P = Vᵀ, B = U, gate σ, c = 1), with
G = dL/dy and the inverted-dropout multiplier ``mask`` (x_d = x ⊙ mask):
    dU = Gᵀ (p ⊙ σ)          h = G U (N, r)
    dσ = Σ_rows(h ⊙ p)       dp = h ⊙ σ
    dV = x_dᵀ dp             dx = G W_h + (dp Vᵀ) ⊙ mask
Without dropout x_d = x and ``dx = G (W_h + U diag(σ) Vᵀ)``. A frozen factor's gradient is never
formed, nor is ``Gᵀ x`` for W_h.

There is no scaling: the factors carry their own magnitude (σ is the spectrum of W0), so the
common config field ``alpha`` is accepted for the shared contract but unused by this variant.
At init ``W_h + U diag(σ) Vᵀ = W0`` to rounding, so the output equals the base output.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..nn.decompose import check_rank, svd_split
from ..nn.module import Parameter
from ._lowrank import LowRankMap, LowRankParts
from .base import AdaptedLinear, AdapterConfig, register

SVD_FACTORS = ("U", "S", "V")
SVD_METHODS = ("exact", "randomized")


def _normalise_train(train) -> tuple:
    """``train`` as a tuple in canonical order; accepts a sequence or "U,S" (the CLI's form)."""
    if isinstance(train, str):
        train = [t.strip() for t in train.split(",") if t.strip()]
    try:
        names = list(train)
    except TypeError:
        raise ValueError(f"train must be a subset of {SVD_FACTORS}, got {train!r}") from None
    if not names:
        raise ValueError(f"train must name at least one of {SVD_FACTORS}, got an empty set")
    unknown = [t for t in names if t not in SVD_FACTORS]
    if unknown:
        raise ValueError(f"train must be a subset of {SVD_FACTORS}, got unknown {unknown}")
    return tuple(f for f in SVD_FACTORS if f in names)


@dataclass
class SvdConfig(AdapterConfig):
    """``alpha`` is unused (no scaling; see the module docstring)."""

    method: str = "exact"
    oversample: int = 10
    n_iter: int = 4
    train: tuple = SVD_FACTORS

    def __post_init__(self):
        super().__post_init__()
        if self.method not in SVD_METHODS:
            raise ValueError(f"method must be one of {SVD_METHODS}, got {self.method!r}")
        for name in ("oversample", "n_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.train = _normalise_train(self.train)


@register("svd", SvdConfig)
class SvdLinear(LowRankMap, AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        # The randomized sketch's seed comes from the layer's host rng, so re-injecting with the
        # same seed (workflows.load_finetuned) rebuilds the same W_h.
        seed = int(rng.integers(2**31)) if cfg.method == "randomized" else 0
        split = svd_split(self.weight.data, cfg.r, method=cfg.method,
                          oversample=cfg.oversample, n_iter=cfg.n_iter, seed=seed)
        self.weight.data = split.residual                                 # W_h (m, n)
        self.svd_U = Parameter(split.U, trainable="U" in cfg.train)       # (m, r)
        self.svd_S = Parameter(split.S, trainable="S" in cfg.train)       # (r,)
        self.svd_V = Parameter(split.Vt.T.copy(), trainable="V" in cfg.train)   # (n, r)

    # --- the map: the low-rank product with P = Vᵀ, B = U, gate σ, c = 1 (_lowrank.py) ---------
    def lowrank_parts(self) -> LowRankParts:
        return LowRankParts(self.svd_V.data.T, self.svd_U, 1.0, self.svd_S.data,
                            need_dP=self.svd_V.trainable, need_dg=self.svd_S.trainable)

    def accumulate_lowrank(self, dVt, dS) -> None:
        if dS is not None:
            self.svd_S.accumulate(dS)                                    # (r,)
        if dVt is not None:
            self.svd_V.accumulate(dVt.T)                                 # (n, r)
