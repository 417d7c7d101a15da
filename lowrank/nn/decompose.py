"""The seed's decomposition ``W = U diag(S) Vt + residual`` (docs/decompose.md#svd-split).

``exact`` keeps the top r triplets of the thin SVD (optimal, Eckart–Young).
``randomized`` is Halko–Martinsson–Tropp (2011): a Gaussian sketch with ``oversample``
extra columns and ``n_iter`` QR-stabilised power iterations. The residual is always computed
as ``W - U diag(S) Vt``, so the reconstruction is exact even when the factors are approximate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import backend


@dataclass
class SVDSplit:
    U: Any          # (m, r), orthonormal columns
    S: Any          # (r,), descending, >= 0
    Vt: Any         # (r, n), orthonormal rows
    residual: Any   # (m, n) = W - U diag(S) Vt

    def low_rank(self):
        return (self.U * self.S) @ self.Vt              # (m, n)


def check_rank(r, shape, field: str = "r") -> None:
    m, n = shape
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(m, n):
        raise ValueError(f"{field} must be an integer in 1..min(m, n) = 1..{min(m, n)} "
                         f"for a {m}x{n} matrix, got {r!r}")


def svd_split(W, r: int, method: str = "exact", oversample: int = 10, n_iter: int = 4,
              seed=0, smallest: bool = False) -> SVDSplit:
    """Split ``W (m, n)`` into its rank-r part and the residual.

    ``smallest=True`` keeps the r *smallest* triplets instead (MiLoRA; exact only).
    """
    if getattr(W, "ndim", None) != 2:
        raise ValueError(f"W must be a 2-D array, got {type(W).__name__} "
                         f"with shape {getattr(W, 'shape', None)}")
    check_rank(r, W.shape)
    backend.check_dtype(W.dtype)
    if not backend.is_finite(W):
        raise ValueError("W contains NaN or Inf; an SVD of it is meaningless")
    if method == "exact":
        U, S, Vt = backend.svd(W)
        keep = slice(len(S) - r, len(S)) if smallest else slice(0, r)
        U, S, Vt = U[:, keep], S[keep], Vt[keep]
    elif method == "randomized":
        if smallest:
            raise ValueError("smallest=True needs method='exact': a sketch finds the top subspace")
        for name, value, high in (("oversample", oversample, 1 << 20), ("n_iter", n_iter, 100)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise ValueError(f"{name} must be an integer in [0, {high}], got {value!r}")
        U, S, Vt = _randomized_svd(W, r, oversample, n_iter, seed)
    else:
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    residual = W - (U * S) @ Vt
    return SVDSplit(U=U, S=S, Vt=Vt, residual=residual)


def _randomized_svd(W, r, oversample, n_iter, seed):
    xp = backend.get_namespace(W)
    m, n = W.shape
    k = min(r + oversample, m, n)
    omega = backend.host_normal(seed, (n, k), dtype=W.dtype, xp=xp)   # (n, k)
    Q, _ = backend.qr(W @ omega)                                      # (m, k)
    for _ in range(n_iter):
        Q, _ = backend.qr(W.T @ Q)                                    # (n, k)
        Q, _ = backend.qr(W @ Q)                                      # (m, k)
    U_small, S, Vt = backend.svd(Q.T @ W)                             # (k, k), (k,), (k, n)
    U = Q @ U_small[:, :r]                                            # (m, r)
    return U, S[:r], Vt[:r]
