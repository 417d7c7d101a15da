"""LoHa (Hyeon-Woo et al., 2108.06098), as PEFT and LyCORIS build it — docs/variants.md#loha.

    ΔW = s (W1 ⊙ W2),   W1 = hada_w1_a hada_w1_b,   W2 = hada_w2_a hada_w2_b,   s = α/r

with ``hada_w*_a (m, r)`` and ``hada_w*_b (r, n)`` (PEFT's names and shapes). The Hadamard
product has rank up to r², but no low-rank path through x: the correction is ``x_d ΔWᵀ``
with ΔW formed densely, as in PEFT. With G = dL/dΔy (N, m):

    dΔW = Gᵀ x_d (m, n),   dW1 = s dΔW ⊙ W2,   dW2 = s dΔW ⊙ W1,
    d hada_w1_a = dW1 hada_w1_bᵀ,   d hada_w1_b = hada_w1_aᵀ dW1   (and likewise for W2),
    dx_adapter = G ΔW

PEFT's init: w1_a, w1_b, w2_a kaiming-uniform (U(±1/√fan_in)), w2_b = 0, so ΔW = 0.
PEFT's LoHa has no input dropout (its rank_dropout/module_dropout are not implemented here,
PEFT's default is 0 for both); lowrank's ``dropout`` applies to x as for every variant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .. import backend
from ..nn.decompose import check_rank
from ..nn.module import Parameter
from ..nn.validate import MAX_ALPHA
from ._peft import (MAX_RANK, Field, ParamCodec, anything, boolean, common_ranks, integer, number,
                    one_of, optional, pattern_dict, pattern_value)
from .base import AdaptedLinear, AdapterConfig, register


@dataclass
class LohaConfig(AdapterConfig):
    def scaling(self) -> float:
        return self.alpha / self.r


def kaiming_uniform(rng, shape, dtype, xp):
    """torch's ``kaiming_uniform_(a=√5)``, PEFT's default: U(±1/√fan_in), fan_in = shape[1]."""
    bound = 1.0 / math.sqrt(shape[1])
    return backend.host_uniform(rng, shape, -bound, bound, dtype, xp)


class LohaState(NamedTuple):
    W1: object      # (m, n) hada_w1_a hada_w1_b
    W2: object      # (m, n) hada_w2_a hada_w2_b
    delta: object   # (m, n) s (W1 ⊙ W2)


@register("loha", LohaConfig)
class LohaLinear(AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        m, n = self.weight.shape
        xp, dtype = self.xp, self.dtype
        self.scaling = cfg.scaling()
        self.hada_w1_a = Parameter(kaiming_uniform(rng, (m, cfg.r), dtype, xp))   # (m, r)
        self.hada_w1_b = Parameter(kaiming_uniform(rng, (cfg.r, n), dtype, xp))   # (r, n)
        self.hada_w2_a = Parameter(kaiming_uniform(rng, (m, cfg.r), dtype, xp))   # (m, r)
        self.hada_w2_b = Parameter(xp.zeros((cfg.r, n), dtype=dtype))            # (r, n)

    def _factors(self) -> LohaState:
        W1 = self.hada_w1_a.data @ self.hada_w1_b.data                    # (m, n)
        W2 = self.hada_w2_a.data @ self.hada_w2_b.data                    # (m, n)
        delta = W1 * W2
        delta *= self.scaling
        return LohaState(W1, W2, delta)

    # --- the map ---------------------------------------------------------------------------
    def has_delta_path(self) -> bool:
        return True

    def delta_weight(self):
        return self._factors().delta

    def correction_forward(self, x2):
        state = self._factors()
        return x2 @ state.delta.T, state                                 # (N, m)

    def correction_backward(self, dy2, cache, need_dx: bool):
        W1, W2, delta = self._factors() if cache.state is None else cache.state
        s = self.scaling
        d_delta = dy2.T @ cache.x2                                       # (m, n)
        for (a, b), other in (((self.hada_w1_a, self.hada_w1_b), W2),
                              ((self.hada_w2_a, self.hada_w2_b), W1)):
            if a.trainable or b.trainable:
                dW = d_delta * other                                     # (m, n)
                dW *= s
                if a.trainable:
                    a.accumulate(dW @ b.data.T)                          # (m, r)
                if b.trainable:
                    b.accumulate(a.data.T @ dW)                          # (r, n)
        return dy2 @ delta if need_dx else None                          # (N, n)


# --- PEFT's format (docs/peft.md#vera-loha-lokr) ---------------------------------------------

# LoHa's and LoKr's common fields; rank/module dropout are not implemented (PEFT's default 0)
LYCORIS_FIELDS = {
    "r": Field(integer(1, MAX_RANK)), "alpha": Field(number(0.0, MAX_ALPHA, low_open=True)),
    "rank_pattern": Field(optional(pattern_dict(integer(1, MAX_RANK)))),
    "alpha_pattern": Field(optional(pattern_dict(number(0.0, MAX_ALPHA, low_open=True)))),
    "rank_dropout": Field(number(0.0, 1.0), 0.0), "module_dropout": Field(number(0.0, 1.0), 0.0),
    "use_effective_conv2d": Field(boolean, False), "init_weights": Field(boolean),
    "exclude_modules": Field(anything, (None, [])),
    "bias": Field(one_of("none"), "none"),   # not PEFT's: lowrank's earlier saves wrote it
}


class LohaCodec(ParamCodec):
    """PEFT's LOHA: the layer's ``hada_w*`` parameters under their own names."""

    peft_type, variant, fields = "LOHA", "loha", LYCORIS_FIELDS
    wraps_conv1d = False   # PEFT's LoHa takes Linear, Conv1d and Conv2d, not GPT-2's Conv1D
    module_keys = required = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def config_fields(self, items, cfg):
        return {**common_ranks(items), "rank_dropout": 0.0, "module_dropout": 0.0,
                "use_effective_conv2d": False, "init_weights": True, "exclude_modules": None}

    def module_fields(self, peft_name, info):
        return {"bias": "none",
                "r": pattern_value(info.get("rank_pattern"), peft_name, info.get("r", 8)),
                "alpha": float(pattern_value(info.get("alpha_pattern"), peft_name,
                                             info.get("alpha", 8)))}


LohaLinear.peft_codec = LohaCodec()
