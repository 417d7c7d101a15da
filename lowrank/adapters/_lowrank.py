"""The low-rank product and its backward, written once (docs/variants.md#lowrank-product).

Not a variant (leading underscore: not auto-imported). Every variant whose correction is

    Δy = c · ((x_d Pᵀ) ⊙ g) Bᵀ,      u = x_d Pᵀ (N, r),   v = u ⊙ g

runs on these two functions: LoRA/rsLoRA/ReLoRA (P = A, g = 1), SoRA (P = A, g = gate),
AdaLoRA/IncreLoRA (P = E ⊙_rows A, g = 1), svd (P = Vᵀ, B = U, g = σ, c = 1) and the low-rank
part of RoSA; DoRA calls the backward with G ⊙ (m/n) in place of G. With G = dL/dΔy:

    dB = c Gᵀ v,   dv = c G B,   dg = Σ_rows(dv ⊙ u),   du = dv ⊙ g,   dP = duᵀ x_d,
    dx_adapter = du P            (the caller applies the dropout mask and adds G W0)

``LowRankMap`` is the mixin that turns a variant's ``lowrank_parts()`` into the
``correction_forward``/``correction_backward`` pair of ``AdaptedLinear``'s skeleton (the
dropout branch, the effective-weight branch and the multi-adapter fast path all use it).
"""
from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, NamedTuple

from ..backend.blocked import add_matmul
from ..nn.module import Parameter
from ._cache import AdapterCache


class LowRankParts(NamedTuple):
    """What a variant's map is made of, as the product above sees it."""

    P: object                # (r, n) the down projection: A, E ⊙_rows A, or Vᵀ
    B: Parameter             # (m, r) the up projection; its gradient accumulates in place
    c: float                 # the scaling
    g: object = None         # (r,) a per-rank gate (SoRA's g, svd's σ), or None for 1
    need_dP: bool = True     # whether dP is wanted (a trainable factor behind P)
    need_dg: bool = False    # whether dg is wanted (a trainable gate)


class LowRankState(NamedTuple):
    """What the forward keeps for the backward of the dropout branch."""

    u: object     # (N, r) x_d Pᵀ
    P: object     # (r, n) the down projection the forward used


class LowRankGrads(NamedTuple):
    dP: object    # (r, n), or None when not asked for
    dg: object    # (r,), or None when not asked for
    dx: object    # (N, n) du P (before the dropout mask), or None when not asked for


def lowrank_forward(x2, P, B, c: float, g=None):
    """``(Δy (N, m), u (N, r))`` with ``Δy = c ((x2 Pᵀ) ⊙ g) Bᵀ``; ``B`` is an array here."""
    u = x2 @ P.T                                                         # (N, r)
    v = u if g is None else u * g                                        # (N, r)
    delta = v @ B.T                                                      # (N, m)
    if c != 1.0:
        delta *= c
    return delta, u


def lowrank_forward_into(y2, x2, P, B, c: float, g=None):
    """``y2 += Δy`` in place (``y2 (N, m)``, the base product); returns ``u (N, r)``. The
    last product accumulates straight into y2 (``blocked.add_matmul``): no (N, m) temporary."""
    u = x2 @ P.T                                                         # (N, r)
    v = u if g is None else u * g                                        # (N, r)
    add_matmul(y2, v, B.T, alpha=c)                                      # y2 += c v Bᵀ
    return u


def lowrank_backward(dy2, x2, u, P, B: Parameter, c: float, g=None, need_dP: bool = True,
                     need_dg: bool = False, need_dx: bool = True) -> LowRankGrads:
    """Accumulate ``dB`` into ``B`` (when trainable); return the other gradients asked for.
    ``dy2 (N, m)`` is G, ``x2 (N, n)`` the dropped-out input; ``u`` is recomputed when the
    forward did not keep it (the effective-weight branch). A frozen factor's gradient is
    never formed."""
    if u is None and (B.trainable or need_dg):
        u = x2 @ P.T                                                     # (N, r)
    if B.trainable:
        dB = dy2.T @ (u if g is None else u * g)                         # (m, r)
        if c != 1.0:
            dB *= c
        B.accumulate(dB)
    if not (need_dP or need_dg or need_dx):
        return LowRankGrads(None, None, None)
    dv = dy2 @ B.data                                                    # (N, r)
    if c != 1.0:
        dv *= c
    dg = (dv * u).sum(axis=0) if need_dg else None                       # (r,)
    du = dv if g is None else dv * g                                     # (N, r)
    dP = du.T @ x2 if need_dP else None                                  # (r, n)
    dx = du @ P if need_dx else None                                     # (N, n)
    return LowRankGrads(dP, dg, dx)


class LowRankMap:
    """Mixin for an ``AdaptedLinear`` whose correction is the product above. The variant
    supplies ``lowrank_parts()`` and ``accumulate_lowrank(dP, dg)`` (where dP and dg go)."""

    fused_correction: ClassVar[bool] = True   # False: the correction adds more than the product

    @abstractmethod
    def lowrank_parts(self) -> LowRankParts:
        """The factors of this layer's correction."""

    @abstractmethod
    def accumulate_lowrank(self, dP, dg) -> None:
        """Add dP and dg into the parameters they belong to."""

    def has_delta_path(self) -> bool:
        return True

    def lowrank_delta(self, parts: LowRankParts | None = None):
        """``c · (B ⊙_cols g) P`` (m, n), the low-rank ΔW."""
        parts = self.lowrank_parts() if parts is None else parts
        Bg = parts.B.data if parts.g is None else parts.B.data * parts.g    # (m, r)
        delta = Bg @ parts.P                                                # (m, n)
        if parts.c != 1.0:
            delta *= parts.c
        return delta

    def delta_weight(self):
        return self.lowrank_delta()

    def effective_weight(self):
        """``W0 + c (B ⊙ g) P`` (m, n): the product accumulates into a copy of W0 (one pass
        over W fewer than forming ΔW and adding it; ``blocked.add_matmul``)."""
        parts = self.lowrank_parts()
        Bg = parts.B.data if parts.g is None else parts.B.data * parts.g    # (m, r)
        W_eff = self.weight.data.copy()                                     # (m, n)
        return add_matmul(W_eff, Bg, parts.P, alpha=parts.c)

    def correction_forward(self, x2):
        parts = self.lowrank_parts()
        delta, u = lowrank_forward(x2, parts.P, parts.B.data, parts.c, parts.g)
        return delta, LowRankState(u, parts.P)

    def add_correction(self, y, x, x_d, mask):
        """The dropout branch's ``y += Δy`` with the last product accumulated into y (a
        variant whose correction is more than the product sets ``fused_correction = False``)."""
        y2 = y.reshape(-1, self.out_features)                            # (N, m), a view
        if not self.fused_correction or not y.flags.c_contiguous:
            return super().add_correction(y, x, x_d, mask)
        parts = self.lowrank_parts()
        x2 = x_d.reshape(-1, self.in_features)                           # (N, n)
        u = lowrank_forward_into(y2, x2, parts.P, parts.B.data, parts.c, parts.g)
        return AdapterCache(x, x2, mask, None, LowRankState(u, parts.P))

    def correction_backward(self, dy2, cache, need_dx: bool):
        parts = self.lowrank_parts()
        state = cache.state
        P, u = (parts.P, None) if state is None else (state.P, state.u)
        grads = lowrank_backward(dy2, cache.x2, u, P, parts.B, parts.c, parts.g,
                                 parts.need_dP, parts.need_dg, need_dx)
        if grads.dP is not None or grads.dg is not None:
            self.accumulate_lowrank(grads.dP, grads.dg)
        return grads.dx
