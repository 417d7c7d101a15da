"""VeRA (Kopiczko et al., 2310.11454), with PEFT's semantics — docs/variants.md#vera.

    y = x W0ᵀ + b0 + λ_b ⊙ (((x_d Aᵀ) ⊙ λ_d) Bᵀ),      ΔW = diag(λ_b) B diag(λ_d) A

A (r, n) and B (m, r) are frozen random projections shared by every adapted layer of a
model: as in PEFT, one pair of the largest shape (r, n_max), (m_max, r) is drawn
kaiming-uniform from ``projection_prng_key`` (bit-identical to PEFT's torch draw) and each
layer uses the slices ``A[:, :n]``, ``B[:m]``. Only λ_d (r,) (init ``d_initial``) and
λ_b (m,) (init 0, so ΔW = 0) train. With G = dL/dΔy, u = x_d Aᵀ (N, r), z = (u ⊙ λ_d) Bᵀ:

    dλ_b = Σ_rows(G ⊙ z),   dv = (G ⊙ λ_b) B,   dλ_d = Σ_rows(dv ⊙ u),   dx_adapter = (dv ⊙ λ_d) A

VeRA has no scaling: ``alpha`` is accepted (every config has it) and unused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .. import backend
from ..nn.decompose import check_rank
from ..nn.module import Parameter
from ..nn.validate import MAX_ALPHA
from ._peft import MAX_RANK, Field, ParamCodec, boolean, integer, number, one_of
from .base import AdaptedLinear, AdapterConfig, check_int, register


@dataclass
class VeraConfig(AdapterConfig):
    d_initial: float = 0.1          # PEFT's initial λ_d
    projection_prng_key: int = 0    # the seed of the shared projections (PEFT's name)
    save_projection: bool = True    # PEFT files: keep A, B in the file, else redraw from the key

    def __post_init__(self):
        super().__post_init__()
        self.d_initial = float(self.d_initial)
        if not math.isfinite(self.d_initial):
            raise ValueError(f"d_initial must be finite, got {self.d_initial!r}")
        check_int("projection_prng_key", self.projection_prng_key, 0)
        if not isinstance(self.save_projection, bool):
            raise ValueError(f"save_projection must be True or False, got {self.save_projection!r}")


def vera_projections(key: int, r: int, shape, dtype, xp):
    """``(A (r, n_max), B (m_max, r))`` for ``shape = (m_max, n_max)``: PEFT's
    ``_kaiming_init`` (U(±√(6 / fan_in)), fan_in = n_max for A and r for B), A drawn first."""
    m_max, n_max = shape
    return backend.host_torch_uniform(key, [((r, n_max), math.sqrt(6.0 / n_max)),
                                            ((m_max, r), math.sqrt(6.0 / r))], dtype, xp)


class VeraState(NamedTuple):
    u: object    # (N, r) x_d Aᵀ
    z: object    # (N, m) (u ⊙ λ_d) Bᵀ


@register("vera", VeraConfig)
class VeraLinear(AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        xp, dtype = self.xp, self.dtype
        # a layer alone draws the pair of its own shape; inject() re-ties all layers of a
        # model to one pair of the largest shape (after_inject), as PEFT does
        self.set_projections(*vera_projections(cfg.projection_prng_key, cfg.r,
                                               self.weight.shape, dtype, xp))
        self.vera_lambda_d = Parameter(xp.full((cfg.r,), cfg.d_initial, dtype=dtype))   # (r,)
        self.vera_lambda_b = Parameter(xp.zeros((self.out_features,), dtype=dtype))     # (m,)

    def set_projections(self, A_shared, B_shared) -> None:
        """Use the slices of a shared pair: plain frozen arrays (PEFT's buffers), not
        Parameters, so the adapter file never holds one copy per layer."""
        m, n = self.weight.shape
        if A_shared.shape[1] < n or B_shared.shape[0] < m or A_shared.shape[0] != self.config.r:
            raise ValueError(f"shared projections {tuple(A_shared.shape)}, "
                             f"{tuple(B_shared.shape)} cannot serve a {m}x{n} layer of rank "
                             f"{self.config.r}")
        self.projection_shape = (int(B_shared.shape[0]), int(A_shared.shape[1]))
        self._shared = (A_shared, B_shared)
        self.vera_A = A_shared[:, :n]                                   # (r, n) view
        self.vera_B = B_shared[:m]                                      # (m, r) view

    def shared_projections(self) -> tuple:
        """``(A (r, n_max), B (m_max, r))``: the whole shared pair, as PEFT's file keeps it
        once (``base_model.vera_A``, ``base_model.vera_B``) with ``save_projection``."""
        return self._shared

    @classmethod
    def after_inject(cls, model, layers) -> None:
        """PEFT's sharing: one pair of the largest (m, n) over the injected layers."""
        if not layers:
            return
        first = layers[0]
        shape = (max(lay.out_features for lay in layers), max(lay.in_features for lay in layers))
        A, B = vera_projections(first.config.projection_prng_key, first.config.r, shape,
                                first.dtype, first.xp)
        for layer in layers:
            layer.set_projections(A, B)

    # --- the map ---------------------------------------------------------------------------
    def has_delta_path(self) -> bool:
        return True

    def delta_weight(self):
        lam_b, lam_d = self.vera_lambda_b.data, self.vera_lambda_d.data
        return (self.vera_B * lam_b[:, None]) @ (self.vera_A * lam_d[:, None])   # (m, n)

    def correction_forward(self, x2):
        u = x2 @ self.vera_A.T                                           # (N, r)
        z = (u * self.vera_lambda_d.data) @ self.vera_B.T                # (N, m)
        return z * self.vera_lambda_b.data, VeraState(u, z)

    def correction_backward(self, dy2, cache, need_dx: bool):
        state = cache.state
        if state is None:   # the effective-weight branch kept only x
            u = cache.x2 @ self.vera_A.T                                 # (N, r)
            z = (u * self.vera_lambda_d.data) @ self.vera_B.T            # (N, m)
        else:
            u, z = state
        lam_d = self.vera_lambda_d.data
        if self.vera_lambda_b.trainable:
            self.vera_lambda_b.accumulate((dy2 * z).sum(axis=0))         # (m,)
        dv = (dy2 * self.vera_lambda_b.data) @ self.vera_B               # (N, r)
        if self.vera_lambda_d.trainable:
            self.vera_lambda_d.accumulate((dv * u).sum(axis=0))          # (r,)
        return (dv * lam_d) @ self.vera_A if need_dx else None           # (N, n)

    # --- adapter files -----------------------------------------------------------------------
    def adapter_metadata(self) -> dict:
        """The projections are redrawn from the key at load, so the file records what decides
        them: the key and the shared shape (PEFT's save_projection=False behaviour)."""
        return {"projection_prng_key": self.config.projection_prng_key,
                "projection_shape": list(self.projection_shape)}

    def load_adapter_metadata(self, extra: dict) -> None:
        key = extra.get("projection_prng_key")
        if key is not None and key != self.config.projection_prng_key:
            raise ValueError(f"the saved VeRA adapter was trained on the projections of "
                             f"projection_prng_key={key}; this model's key is "
                             f"{self.config.projection_prng_key}")
        saved = extra.get("projection_shape")
        if saved is not None and tuple(saved) != self.projection_shape:
            raise ValueError(f"the saved VeRA adapter shared projections of shape {tuple(saved)} "
                             f"(over its targets); this model's are {self.projection_shape}: "
                             "inject the same targets")


# --- PEFT's format (docs/peft.md#vera-loha-lokr) ---------------------------------------------

class VeraCodec(ParamCodec):
    """PEFT's VERA: the λ's per module; the shared pair once, whole, as ``base_model.vera_A``
    (r, n_max) and ``base_model.vera_B`` (m_max, r) with ``save_projection`` (PEFT's default),
    else redrawn from ``projection_prng_key`` at load over the largest shape, as PEFT does."""

    peft_type, variant = "VERA", "vera"
    module_keys = required = ("vera_lambda_b", "vera_lambda_d")
    shared_keys = {"base_model.vera_A": 0, "base_model.vera_B": 1}
    fields = {"r": Field(integer(1, MAX_RANK)),
              "projection_prng_key": Field(integer(0, 2**63 - 1)),
              "save_projection": Field(boolean),
              "vera_dropout": Field(number(0.0, 1.0, False, True)),
              "d_initial": Field(number(-MAX_ALPHA, MAX_ALPHA)), "fan_in_fan_out": Field(boolean),
              "bias": Field(one_of("none", "all", "vera_only"), "none"),
              "init_weights": Field(boolean)}

    def save(self, items, cfg):
        layers = list(items.values())
        if len({id(layer.shared_projections()[0]) for layer in layers}) > 1 or \
                any(layer.config.r != cfg.r for layer in layers):
            raise ValueError("VeRA layers of one PEFT adapter share one projection pair of one "
                             "rank; these layers hold several (inject them in one call)")
        tensors, fields = super().save(items, cfg)
        if cfg.save_projection:
            A, B = layers[0].shared_projections()   # (r, n_max), (m_max, r)
            tensors.update({"base_model.vera_A": A, "base_model.vera_B": B})
        return tensors, fields

    def config_fields(self, items, cfg):
        return {"r": cfg.r, "d_initial": cfg.d_initial, "bias": "none",
                "projection_prng_key": cfg.projection_prng_key,
                "save_projection": cfg.save_projection, "vera_dropout": cfg.dropout,
                "init_weights": True}

    def module_fields(self, peft_name, info):
        return {"bias": "none", "r": info.get("r", 256), "d_initial": info.get("d_initial", 0.1),
                "projection_prng_key": info.get("projection_prng_key", 0),
                "save_projection": info.get("save_projection", True),
                "dropout": float(info.get("vera_dropout") or 0.0)}

    def after_load(self, layers, shared, where):
        """One projection pair for every layer: the file's, or PEFT's redraw from the key."""
        if not layers:
            return
        if not shared:
            VeraLinear.after_inject(None, layers)
            return
        if len(shared) != 2:
            raise ValueError(f"{where}: VERA file holds one of base_model.vera_A / vera_B only "
                             "(the file is incomplete)")
        A, B, r = shared[0], shared[1], layers[0].config.r
        m_max = max(layer.out_features for layer in layers)
        n_max = max(layer.in_features for layer in layers)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r \
                or A.shape[1] < n_max or B.shape[0] < m_max:
            raise ValueError(f"{where}: VERA projections {A.shape}, {B.shape} cannot serve rank "
                             f"{r} layers up to {m_max}x{n_max}")
        first = layers[0]
        A, B = (backend.asarray(a, dtype=first.dtype, xp=first.xp) for a in (A, B))
        for layer in layers:
            layer.set_projections(A, B)


VeraLinear.peft_codec = VeraCodec()
