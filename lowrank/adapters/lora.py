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
from collections import Counter
from dataclasses import dataclass

from .. import backend
from ..nn.decompose import check_rank, svd_split
from ..nn.module import Parameter
from ..files.storage import host_copy
from ..nn.validate import MAX_ALPHA
from ._peft import (MAX_RANK, PEFT_PREFIX, Field, PeftCodec, Piece, boolean, data_driven_piece,
                    integer, missing_tensor, number, one_of, optional, pattern_dict,
                    pattern_value, row_blocks, text)
from ._lowrank import LowRankMap, LowRankParts
from .base import AdaptedLinear, AdapterConfig, check_int, register

LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<q>", "olora", "milora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)$")
DATA_DRIVEN = ("pissa", "olora", "milora")   # inits that rewrite the base weight


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


def _unset(name, value):
    return value


# PEFT's LoraConfig fields (shared with AdaLoraConfig). Those lowrank does not implement are
# read only at the value under which they change nothing (the ``noop`` of their Field).
LORA_FIELDS = {
    "r": Field(integer(1, MAX_RANK)),
    "lora_alpha": Field(number(0.0, MAX_ALPHA, low_open=True)),
    "lora_dropout": Field(number(0.0, 1.0, high_open=True)),
    "fan_in_fan_out": Field(boolean),
    "bias": Field(one_of("none", "all", "lora_only"), "none"),
    "use_rslora": Field(boolean),
    "use_dora": Field(boolean),
    "init_lora_weights": Field(one_of(True, False, "gaussian")),   # PiSSA & co rewrite the base
    "rank_pattern": Field(optional(pattern_dict(integer(1, MAX_RANK)))),
    "alpha_pattern": Field(optional(pattern_dict(number(0.0, MAX_ALPHA, low_open=True)))),
    "megatron_core": Field(optional(text)),             # read only with megatron_config
    "qalora_group_size": Field(integer(1, MAX_RANK)),   # read only with use_qalora
    "runtime_config": Field(_unset),                    # where PEFT runs, not what it computes
    "loftq_config": Field(_unset, ({}, None)), "exclude_modules": Field(_unset, (None, [])),
    **{name: Field(_unset, None) for name in (
        "megatron_config", "trainable_token_indices", "eva_config",
        "corda_config", "lora_ga_config", "velora_config", "alora_invocation_tokens",
        "monteclora_config", "layer_replication", "target_parameters", "use_bdlora",
        "arrow_config", "kasa_config")},
    **{name: Field(boolean, False) for name in ("use_qalora", "lora_bias",
                                                "ensure_weight_tying")},
}


class LoraCodec(PeftCodec):
    """LoRA and rsLoRA as PEFT's LORA (docs/peft.md#the-files); DoRA subclasses it."""

    peft_type, fused, fields = "LORA", True, LORA_FIELDS
    module_keys = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    variant = "lora"

    def claims(self, info):
        return bool(info.get("use_dora")) == (self.variant == "dora")

    def piece(self, layer, original_weight) -> Piece:
        A, B = host_copy(layer.lora_A.data), host_copy(layer.lora_B.data)
        if str(layer.config.init).startswith(DATA_DRIVEN):
            A, B = data_driven_piece(A, B, layer.scaling, original_weight(),
                                     host_copy(layer.weight.data))
        mag = host_copy(layer.lora_magnitude_vector.data) if self.variant == "dora" else None
        return Piece(self.variant, A, B, layer.scaling, mag=mag)

    def save(self, items, cfg):
        """The most common (r, α) is global, the others go to rank_pattern / alpha_pattern."""
        tensors = {}
        for name, p in items.items():
            key = f"{PEFT_PREFIX}{name}."
            tensors.update({key + "lora_A.weight": p.A, key + "lora_B.weight": p.B})
            if p.mag is not None:
                tensors[key + "lora_magnitude_vector"] = p.mag

        def alpha_of(r):
            ratio = r / cfg.r
            return cfg.alpha * (math.sqrt(ratio) if cfg.rslora else ratio)
        ranks = {name: int(p.A.shape[0]) for name, p in items.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        return tensors, {"r": r, "lora_alpha": alpha_of(r), "lora_dropout": cfg.dropout,
                         "bias": cfg.bias,
                         "rank_pattern": {n: k for n, k in ranks.items() if k != r},
                         "alpha_pattern": {n: alpha_of(k) for n, k in ranks.items() if k != r},
                         "use_rslora": cfg.rslora, "use_dora": self.variant == "dora",
                         "init_lora_weights": True}

    def load_module(self, peft_name, found, info, parts, where):
        A, B = lora_pair(peft_name, found, self.module_keys[:2], where)
        r = A.shape[0]
        expected = pattern_value(info.get("rank_pattern"), peft_name, info.get("r", 8))
        if expected != r:
            raise ValueError(f"{where}: module {peft_name!r}: the config gives rank "
                             f"{expected} (r / rank_pattern), its tensors have rank {r}")
        alpha = pattern_value(info.get("alpha_pattern"), peft_name, info.get("lora_alpha", 8))
        fields = {"r": r, "alpha": float(alpha), "rslora": bool(info.get("use_rslora")),
                  "dropout": float(info.get("lora_dropout") or 0.0), "bias": "none"}
        mag = found.get("lora_magnitude_vector")
        if (mag is not None) != (self.variant == "dora"):
            raise ValueError(f"{where}: module {peft_name!r}: use_dora is "
                             f"{self.variant == 'dora'} but the module "
                             f"{'has no' if mag is None else 'holds a'} lora_magnitude_vector")
        out = []
        for name, rows in row_blocks(parts, B.shape[0]):
            params = {"lora_A": A, "lora_B": B[rows]}
            if mag is not None:
                params["lora_magnitude_vector"] = mag[rows]
            out.append((name, self.variant, dict(fields), params, {}))
        return out


def lora_pair(peft_name, found, keys, where):
    """``(A (r, n), B (m, r))`` of one module, checked to be a pair."""
    for key in keys:
        if key not in found:
            raise missing_tensor(where, peft_name, key)
    A, B = found[keys[0]], found[keys[1]]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"{where}: module {peft_name!r}: {keys[0]} {A.shape} and {keys[1]} "
                         f"{B.shape} are not a (r, n), (m, r) pair")
    return A, B


LoraLinear.peft_codec = LoraCodec()
