"""DoRA (Liu et al., 2402.09353) with PEFT semantics (``LoraConfig(use_dora=True)``) — docs/variants.md#dora.

A LoRA pair ``A (r, n)``, ``B (m, r)`` (kaiming A, B = 0; s = α/r or α/√r with ``rslora``) moves
the direction, a magnitude ``m (out,)`` ("lora_magnitude_vector", init ‖W0[o, :]‖₂) its length:

    V = W0 + s·BA,   n_o = ‖V[o, :]‖₂,   c = m / n,   W' = diag(c) V
    no dropout:  y = c ⊙ z + b0,                          z = x W0ᵀ + s (x Aᵀ) Bᵀ = x Vᵀ
    dropout:     y = x W0ᵀ + b0 + (c−1) ⊙ q + c ⊙ t,      q = x_d W0ᵀ, t = s u Bᵀ, u = x_d Aᵀ

(PEFT's dropout form: the base path sees x, the adapter path x_d.) Write z_d = q + t, so that
``y = x W0ᵀ + b0 − q + c ⊙ z_d``; without dropout x_d = x and z_d = z. With G = dL/dy and
``S_o = Σ_rows(G ⊙ z_d)[o]`` (= ∂L/∂c_o), ``G_z = G ⊙ c``:

  norm detached (default; PEFT and the paper §4.3 treat n as a constant):
    dm = S / n,   dB = s G_zᵀ u,   du = s G_z B,   dA = duᵀ x_d
    dx = G W0 + ((G ⊙ (c−1)) W0 + du A) ⊙ mask      (no dropout: dx = G_z V)
  exact (``exact_norm_grad=True``), n differentiated too: c_o = m_o / n_o gives
    dn = −(m/n²) ⊙ S = −c ⊙ S / n,   ∂n_o/∂V[o, :] = V[o, :] / n_o  ⇒  dV = diag(dn / n) V,
    dB += s dV Aᵀ,   dA += s Bᵀ dV    (dm and dx unchanged: x does not enter n).
The same formulas hold with and without dropout because the mask only changes z_d.

Finite differences see the full map, in which n depends on A and B, so they match the detached
gradient only while n is held fixed: ``hold_norm()`` (a context manager) freezes n at its current
value; ``finite_difference_context()`` is that in detached mode and a no-op in exact mode.

Inits (``init``, PEFT's ``init_lora_weights`` with ``use_dora=True``): "kaiming" (default),
"gaussian", "pissa", "pissa_niter_<q>", "olora" — the LoRA inits of lora.py; the data-driven
ones rewrite W0 into the residual first, and the magnitude is then PEFT's
``‖W_res + s·BA‖`` per row (= ‖W0‖ to rounding), so the output starts at the base's.

Merge: ``W ← diag(c) V``; the factor c is kept so that unmerge restores ``W0 = W / c − s·BA``
(to rounding); a zero magnitude entry would erase its row, so such a merge is refused.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

from .. import backend
from ..nn.decompose import check_rank
from ..nn.module import Parameter
from ._lowrank import lowrank_backward
from .base import AdaptedLinear, AdapterConfig, check_int, register
from .lora import _PISSA_NITER, LoraCodec, lora_factors

DORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<q>", "olora")


class DoraCache(NamedTuple):
    x2: object      # (N, n) x_d flattened (x without dropout)
    mask: object    # the inverted-dropout multiplier, or None
    u: object       # (..., r) x_d Aᵀ (dropout branch), or None
    z: object       # (..., m) z_d = x_d Vᵀ: ∂L/∂c = Σ_rows(G ⊙ z_d)
    V: object       # (m, n) the direction W0 + s·BA
    norm: object    # (m,) its row norms (or the held constant)
    c: object       # (m,) m / n


@dataclass
class DoraConfig(AdapterConfig):
    rslora: bool = False
    exact_norm_grad: bool = False
    init: str = "kaiming"        # one of DORA_INITS, as PEFT combines them with DoRA
    pissa_oversample: int = 0    # as LoraConfig's

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("kaiming", "gaussian", "pissa", "olora") \
                and not _PISSA_NITER.match(str(self.init)):
            raise ValueError(f"init must be one of {DORA_INITS}, got {self.init!r}")
        check_int("pissa_oversample", self.pissa_oversample, 0)
        for name in ("rslora", "exact_norm_grad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def row_norms(W):
    """``‖W[o, :]‖₂`` (m,), in W's dtype (PEFT: ``torch.linalg.norm(weight, dim=1)``)."""
    xp = backend.get_namespace(W)
    return xp.sqrt((W * W).sum(axis=1))                                # (m,)


@register("dora", DoraConfig)
class DoraLinear(AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        W0 = self.weight.data
        if not backend.is_finite(W0):
            raise ValueError("W0 contains NaN or Inf; DoRA's row norms of it are meaningless")
        norms = row_norms(W0)                                            # (m,)
        if float(norms.min()) == 0.0:
            # direction W0[o]/‖W0[o]‖ is undefined: PEFT would divide by zero and emit NaN
            raise ValueError("W0 has an all-zero row; DoRA needs a nonzero norm in every row")
        self.scaling = cfg.scaling()
        A, B, self.weight.data = lora_factors(W0, cfg.r, self.scaling, cfg.init, rng,
                                              cfg.pissa_oversample)
        self.lora_A = Parameter(A)                    # (r, n), "lora_A.weight"
        self.lora_B = Parameter(B)                    # (m, r), "lora_B.weight"
        if cfg.init not in ("kaiming", "gaussian"):   # PEFT: ‖W_res + s·BA‖ after the init
            norms = row_norms(self.direction())                          # (m,)
        self.lora_magnitude_vector = Parameter(norms)  # (m,), PEFT's name
        self._held_norm = None      # set by hold_norm(): n treated as a constant array
        self._merge_factor = None   # c = m/n used by the last merge, for unmerge

    # --- the pieces of the map ------------------------------------------------------------
    def direction(self, W0=None):
        """``V = W0 + s·BA`` (m, n), the unnormalised direction."""
        V = self.lora_B.data @ self.lora_A.data                         # (m, n)
        V *= self.scaling
        V += self.weight.data if W0 is None else W0
        return V

    def _norm(self, V):
        """Row norms of V, or the constant frozen by ``hold_norm()``."""
        return row_norms(V) if self._held_norm is None else self._held_norm

    @contextlib.contextmanager
    def hold_norm(self):
        """Treat n as the constant it is now (what the detached backward differentiates)."""
        if self.merged:
            raise RuntimeError("hold_norm() on a merged adapter: unmerge() first")
        self._held_norm = row_norms(self.direction())                   # (m,)
        try:
            yield self._held_norm
        finally:
            self._held_norm = None

    def finite_difference_context(self):
        """The context in which finite differences see the function the backward differentiates."""
        return contextlib.nullcontext() if self.config.exact_norm_grad else self.hold_norm()

    # --- forward / backward -----------------------------------------------------------------
    def adapter_forward(self, x, dropout_mask):
        x_d, mask = self.dropout(x, dropout_mask)
        V = self.direction()                                             # (m, n)
        norm = self._norm(V)                                             # (m,)
        c = self.lora_magnitude_vector.data / norm                       # (m,)
        b = self._bias_data()
        if mask is None:
            # y = c ⊙ (x Vᵀ) + b0: one dense product; z is kept for dm and the exact norm term.
            z = x @ V.T                                                  # (..., m)
            y = z * c                                                    # (..., m)
            if b is not None:
                y += b
            return y, DoraCache(x.reshape(-1, self.in_features), None, None, z, V, norm, c)
        q = x_d @ self.weight.data.T                                     # (..., m)
        u = x_d @ self.lora_A.data.T                                     # (..., r)
        z = u @ self.lora_B.data.T                                       # (..., m)
        z *= self.scaling
        z += q                                                           # z_d = q + t
        y = z * c                                                        # (..., m)
        y -= q
        y += x @ self.weight.data.T                                      # (..., m)
        if b is not None:
            y += b
        return y, DoraCache(x_d.reshape(-1, self.in_features), mask, u, z, V, norm, c)

    def adapter_backward(self, dy, cache, need_dx: bool):
        x2, mask, u, z, V, norm, c = cache
        A, B, mag, s = self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling
        exact = self.config.exact_norm_grad
        m = B.shape[0]
        dy2 = dy.reshape(-1, m)                                          # (N, m)
        if mag.trainable or exact:
            S = (dy2 * z.reshape(-1, m)).sum(axis=0)                     # (m,) = ∂L/∂c
        if mag.trainable:
            mag.accumulate(S / norm)                                     # (m,)
        Gz = dy2 * c                                                     # (N, m)
        # the LoRA pair sees G_z = G ⊙ c: the low-rank product's backward (_lowrank.py)
        u2 = None if u is None else u.reshape(-1, A.shape[0])            # (N, r)
        grads = lowrank_backward(Gz, x2, u2, A.data, B, s, need_dP=A.trainable,
                                 need_dx=need_dx and mask is not None)
        if exact and (A.trainable or B.trainable):   # n's share, docs/variants.md#dora-exact-norm
            dV = V * (-(c * S) / (norm * norm))[:, None]                 # (m, n) = diag(dn/n) V
            dV *= s                                                      # s dV, shared by dA, dB
            if B.trainable:
                B.accumulate(dV @ A.data.T)                              # (m, r)
        if A.trainable:
            dA = grads.dP                                                # (r, n)
            if exact:
                dA += B.data.T @ dV                                      # (r, n)
            A.accumulate(dA)
        if not need_dx:
            return None
        if mask is None:   # G_z W0 + du A = G_z V
            return (Gz @ V).reshape(*dy.shape[:-1], A.shape[1])          # (..., n)
        Gz -= dy2                                                        # G ⊙ (c − 1)
        dx_adapter = Gz @ self.weight.data                               # (N, n)
        dx_adapter += grads.dx                                           # du A
        dx = self.masked_input_grad(dx_adapter, mask, (*dy.shape[:-1], A.shape[1]))
        return self.base_input_grad(dy, dx)

    # --- merging ------------------------------------------------------------------------------
    def _base_weight(self):
        """W0 whether or not the adapter is merged."""
        return self.unmerged_weight() if self.merged else self.weight.data

    def merged_weight(self):
        V = self.direction()                                             # (m, n)
        c = self.lora_magnitude_vector.data / self._norm(V)              # (m,)
        if not backend.is_finite(c) or float(abs(c).min()) == 0.0:
            raise RuntimeError("cannot merge: a zero or non-finite magnitude/norm ratio would "
                               "erase rows of W0, so unmerge could not restore them")
        self._merge_factor = c
        V *= c[:, None]                                                  # (m, n) = diag(c) V
        return V

    def unmerged_weight(self):
        W0 = self.weight.data / self._merge_factor[:, None]              # (m, n) = V
        W0 -= self.scaling * (self.lora_B.data @ self.lora_A.data)
        return W0

    def delta_weight(self):
        """``diag(c) V − W0`` (m, n): the unmerged forward without dropout is x (W0 + ΔW)ᵀ + b0."""
        W0 = self._base_weight()
        V = self.direction(W0)                                           # (m, n)
        V *= (self.lora_magnitude_vector.data / self._norm(V))[:, None]
        V -= W0
        return V


class DoraCodec(LoraCodec):
    """DoRA as PEFT's LORA with ``use_dora``: LoRA's tensors plus ``lora_magnitude_vector``."""

    variant = "dora"


DoraLinear.peft_codec = DoraCodec()
