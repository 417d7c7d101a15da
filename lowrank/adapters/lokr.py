"""LoKr (Edalati et al. 2212.10650 / LyCORIS 2309.14859), with PEFT's semantics —
docs/variants.md#lokr.

    ΔW = s · kron(W1, W2),   s = α/r,   W1 (out_l, in_m),   W2 (out_k, in_n)

with ``(out_l, out_k) = factorization(m)``, ``(in_m, in_n) = factorization(n)`` (PEFT's: the
divisor pair nearest √dim, or the one at ``decompose_factor``). W2 is the low-rank product
``lokr_w2_a (out_k, r) lokr_w2_b (r, in_n)`` when ``r < max(out_k, in_n)/2``, else one full
matrix ``lokr_w2``; W1 is ``lokr_w1`` unless ``decompose_both`` (then ``lokr_w1_a lokr_w1_b``
under the same rule). The Kronecker structure keeps the correction cheap: with x_d viewed as
X (N, in_m, in_n) and G as (N, out_l, out_k),

    T = X W2ᵀ (N, in_m, out_k),   Δy = s · W1 T
    dW1 = s Σ_N G Tᵀ,   U = W1ᵀ G (N, in_m, out_k),   dW2 = s Σ_N Uᵀ X,   dx_adapter = s U W2

and a factored W = a b gets ``da = dW bᵀ``, ``db = aᵀ dW``. PEFT's init (``init_weights=True``):
W1 (or w1_a) = 0, the rest kaiming-uniform; ``"lycoris"``: W2 (or w2_b) = 0 instead.
PEFT's rank_dropout/module_dropout are off (not implemented; PEFT's default 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..nn.decompose import check_rank
from ..nn.module import Parameter
from ._peft import Field, boolean, one_of
from .base import AdaptedLinear, AdapterConfig, register
from .loha import LYCORIS_FIELDS, LohaCodec, kaiming_uniform


@dataclass
class LokrConfig(AdapterConfig):
    decompose_both: bool = False
    decompose_factor: int = -1
    init_weights: object = True     # True (PEFT's default) or "lycoris"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.decompose_both, bool):
            raise ValueError(f"decompose_both must be True or False, got {self.decompose_both!r}")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) \
                or (self.decompose_factor < 1 and self.decompose_factor != -1):
            raise ValueError(f"decompose_factor must be -1 or an integer >= 1, got "
                             f"{self.decompose_factor!r}")
        if self.init_weights is not True and self.init_weights != "lycoris":
            raise ValueError(f"init_weights must be True or 'lycoris', got {self.init_weights!r}")

    def scaling(self) -> float:
        return self.alpha / self.r


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of ``dimension`` into ``(small, large)`` with small·large = dimension: the
    exact ``factor`` when it divides (then in that order, as PEFT), else the divisors walked
    up from 1 to the first at or past √dimension, or the last one <= ``factor``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    small, large = 1, dimension
    while small < large:
        cand = small + 1
        while dimension % cand:
            cand += 1
        if cand + dimension // cand > 1 + dimension or cand > limit:   # PEFT's bound, kept
            break
        small, large = cand, dimension // cand
    return min(small, large), max(small, large)


class LokrState(NamedTuple):
    W1: object    # (out_l, in_m)
    W2: object    # (out_k, in_n)
    T: object     # (N, in_m, out_k) X W2ᵀ


@register("lokr", LokrConfig)
class LokrLinear(AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        m, n = self.weight.shape
        xp, dtype = self.xp, self.dtype
        self.scaling = cfg.scaling()
        self.out_split = factorization(m, cfg.decompose_factor)          # (out_l, out_k)
        self.in_split = factorization(n, cfg.decompose_factor)           # (in_m, in_n)
        (out_l, out_k), (in_m, in_n) = self.out_split, self.in_split
        full_w1 = not (cfg.decompose_both and cfg.r < max(out_l, in_m) / 2)
        full_w2 = not cfg.r < max(out_k, in_n) / 2
        zero_w1 = cfg.init_weights is True   # PEFT zeroes W1's side, LyCORIS W2's

        def draw(shape, zero):
            return Parameter(xp.zeros(shape, dtype=dtype) if zero
                             else kaiming_uniform(rng, shape, dtype, xp))

        if full_w1:
            self.lokr_w1 = draw((out_l, in_m), zero_w1)
        else:
            self.lokr_w1_a = draw((out_l, cfg.r), zero_w1)
            self.lokr_w1_b = draw((cfg.r, in_m), False)
        if full_w2:
            self.lokr_w2 = draw((out_k, in_n), not zero_w1)
        else:
            self.lokr_w2_a = draw((out_k, cfg.r), False)
            self.lokr_w2_b = draw((cfg.r, in_n), not zero_w1)

    def _factor(self, which: str):
        """``(W, pair)``: the factor and its Parameters, ``(W,)`` full or ``(a, b)``."""
        full = getattr(self, f"lokr_{which}", None)
        if full is not None:
            return full.data, (full,)
        a, b = getattr(self, f"lokr_{which}_a"), getattr(self, f"lokr_{which}_b")
        return a.data @ b.data, (a, b)

    @staticmethod
    def _accumulate(dW, params) -> None:
        if len(params) == 1:
            if params[0].trainable:
                params[0].accumulate(dW)
            return
        a, b = params
        if a.trainable:
            a.accumulate(dW @ b.data.T)
        if b.trainable:
            b.accumulate(a.data.T @ dW)

    # --- the map ---------------------------------------------------------------------------
    def has_delta_path(self) -> bool:
        return True

    def delta_weight(self):
        xp = self.xp
        delta = xp.kron(self._factor("w1")[0], self._factor("w2")[0])   # (m, n)
        delta *= self.scaling
        return delta

    def _inner(self, x2, W2):
        X = x2.reshape(x2.shape[0], *self.in_split)                      # (N, in_m, in_n)
        return X, X @ W2.T                                               # (N, in_m, out_k)

    def correction_forward(self, x2):
        W1, W2 = self._factor("w1")[0], self._factor("w2")[0]
        _, T = self._inner(x2, W2)
        Y = W1 @ T                                                       # (N, out_l, out_k)
        delta = Y.reshape(x2.shape[0], self.out_features)                # (N, m)
        delta *= self.scaling
        return delta, LokrState(W1, W2, T)

    def correction_backward(self, dy2, cache, need_dx: bool):
        xp, s = self.xp, self.scaling
        (W1, p1), (W2, p2) = self._factor("w1"), self._factor("w2")
        X, T = self._inner(cache.x2, W2) if cache.state is None else \
            (cache.x2.reshape(cache.x2.shape[0], *self.in_split), cache.state.T)
        G = dy2.reshape(dy2.shape[0], *self.out_split)                   # (N, out_l, out_k)
        if any(p.trainable for p in p1):
            dW1 = xp.tensordot(G, T, axes=([0, 2], [0, 2]))              # (out_l, in_m)
            dW1 *= s
            self._accumulate(dW1, p1)
        U = xp.swapaxes(G, 1, 2) @ W1                                    # (N, out_k, in_m)
        if any(p.trainable for p in p2):
            dW2 = xp.tensordot(U, X, axes=([0, 2], [0, 1]))              # (out_k, in_n)
            dW2 *= s
            self._accumulate(dW2, p2)
        if not need_dx:
            return None
        dX = xp.swapaxes(U, 1, 2) @ W2                                   # (N, in_m, in_n)
        dX *= s
        return dX.reshape(dy2.shape[0], self.in_features)                # (N, n)


# --- PEFT's format (docs/peft.md#vera-loha-lokr) ---------------------------------------------

def _factor(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or \
            not (value == -1 or 1 <= value <= 1 << 40):
        raise ValueError(f"field {name!r} must be -1 or an integer >= 1, got {value!r}")
    return value


class LokrCodec(LohaCodec):
    """PEFT's LOKR: the layer's ``lokr_w*`` parameters (which ones: the config's rule)."""

    peft_type, variant = "LOKR", "lokr"
    module_keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    required = ()
    fields = {**LYCORIS_FIELDS, "decompose_both": Field(boolean),
              "decompose_factor": Field(_factor), "rank_dropout_scale": Field(boolean, False),
              "init_weights": Field(one_of(True, False, "lycoris"))}

    def config_fields(self, items, cfg):
        return {**super().config_fields(items, cfg), "decompose_both": cfg.decompose_both,
                "decompose_factor": cfg.decompose_factor, "rank_dropout_scale": False,
                "init_weights": cfg.init_weights}

    def module_fields(self, peft_name, info):
        init = info.get("init_weights", True)
        return {**super().module_fields(peft_name, info),
                "decompose_both": info.get("decompose_both", False),
                "decompose_factor": info.get("decompose_factor", -1),
                "init_weights": "lycoris" if init == "lycoris" else True}


LokrLinear.peft_codec = LokrCodec()
