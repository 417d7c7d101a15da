"""What every adapter shares: the config base class, the registry, and ``AdaptedLinear``.

A variant is one file: a config dataclass and an ``AdaptedLinear`` subclass registered under
its name (``@register("lora", LoraConfig)``), and its PEFT format if PEFT has it; the contract
tests run over it automatically (docs/variants.md#contract).

``AdaptedLinear`` declares every extension point the trainer, the adapter files, the reports
and the multi-adapter path use, each with a documented default; a variant overrides some.
"""
from __future__ import annotations

import contextlib
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

from .. import backend
from ..backend.blocked import add_matmul
from ..nn.module import Module, Parameter
from ..ops.linear import check_input, linear_forward, weight_operand
from ..nn.validate import (MAX_ALPHA, check_int, check_number, check_seed,  # noqa: F401
                           config_error, field_from_text, near_fields)
from ._cache import AdapterCache

BIAS_MODES = ("none", "lora_only", "all")
_REGISTRY: dict[str, tuple[type, type]] = {}


@dataclass
class AdapterConfig:
    """Fields every variant has. ``bias`` follows PEFT: 'lora_only'/'all' train the layer's bias."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    bias: str = "none"

    variant: ClassVar[str] = ""

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        self.alpha = check_number("alpha", self.alpha, 0.0, MAX_ALPHA, low_open=True)
        if not 0.0 <= check_number("dropout", self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")

    def to_dict(self) -> dict:
        return {"variant": self.variant, **{f.name: getattr(self, f.name) for f in fields(self)}}


def register(name: str, config_cls: type):
    """Class decorator: register an ``AdaptedLinear`` subclass and its config under ``name``."""
    def decorate(layer_cls):
        if name in _REGISTRY:
            raise ValueError(f"variant {name!r} is registered twice")
        config_cls.variant = name
        layer_cls.variant = name
        _REGISTRY[name] = (config_cls, layer_cls)
        return layer_cls
    return decorate


def available() -> list[str]:
    return list(_REGISTRY)


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown adapter variant {name!r}; registered: {available()}")
    return _REGISTRY[name]


PEFT_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora"}


def config(name: str, **kwargs) -> AdapterConfig:
    """``config("lora", r=8, alpha=16, ...)``: the validated config of a registered variant.
    PEFT's names work too (docs/peft.md#config): ``lora_alpha``, ``lora_dropout``,
    ``use_rslora``, and ``use_dora=True`` (a "lora" config becomes "dora")."""
    kwargs = {PEFT_ALIASES.get(k, k): v for k, v in kwargs.items()}
    if kwargs.pop("use_dora", False):
        name = "dora" if name == "lora" else name
    config_cls, _ = _lookup(name)
    names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for variant {name!r}"
                         f"{near_fields(unknown, names)}; fields: {sorted(names)}")
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:   # one that names no field gets the field's name
        raise config_error(config_cls, kwargs, exc) from None


def config_from_dict(data: dict) -> AdapterConfig:
    data = dict(data)
    return config(data.pop("variant"), **data)


class Report(list):
    """``report``'s answer: the lines (it is their list) and ``facts`` {module name: dict}."""

    def __init__(self, lines=(), facts: dict | None = None):
        super().__init__(lines)
        self.facts = dict(facts or {})


class AdaptedLinear(Module, metaclass=ABCMeta):
    """A frozen linear ``(W0, b0)`` plus a trainable adapter that owns the whole adapted map.

    ``AdaptedLinear(W0, b0, cfg, seed)`` builds the registered subclass for ``cfg.variant``.
    ``W0`` and ``b0`` are copied: an init that rewrites the base (PiSSA, OLoRA, ...) never
    touches the caller's arrays. Subclasses implement ``init_adapter`` and ``delta_weight``,
    and either the correction pair (``correction_forward``/``correction_backward``, which the
    skeleton below wraps in dropout, the effective weight and the base product) or the whole
    ``adapter_forward``/``adapter_backward`` (DoRA, whose map is not base plus correction).
    """

    variant: ClassVar[str] = ""

    def __new__(cls, W0=None, b0=None, cfg=None, seed=0):
        if cls is AdaptedLinear:
            if not isinstance(cfg, AdapterConfig):
                raise ValueError(f"cfg must be an adapter config, got {type(cfg).__name__}")
            cls = _lookup(cfg.variant)[1]
        return super().__new__(cls)

    def __init__(self, W0, b0, cfg: AdapterConfig, seed=0):
        if not isinstance(cfg, _lookup(self.variant)[0]):
            raise ValueError(f"{type(self).__name__} needs a {self.variant!r} config, "
                             f"got {type(cfg).__name__}")
        if getattr(W0, "ndim", None) != 2:
            raise ValueError(f"W0 must be a 2-D array (out_features, in_features), got "
                             f"shape {getattr(W0, 'shape', None)}")
        xp = backend.get_namespace(W0, b0)
        backend.check_dtype(W0.dtype)
        if b0 is not None and (tuple(b0.shape) != (W0.shape[0],) or b0.dtype != W0.dtype):
            raise ValueError(f"b0 must have shape ({W0.shape[0]},) and dtype {W0.dtype}, got "
                             f"{tuple(b0.shape)} {b0.dtype}")
        self.config = cfg
        self.merged = False
        self.weight = Parameter(W0.copy(), trainable=False)
        train_bias = cfg.bias != "none" and b0 is not None
        self.bias = None if b0 is None else Parameter(b0.copy(), trainable=train_bias)
        self._host_rng = backend.host_rng(check_seed(seed))
        self._dropout_rng = backend.DeviceRNG(int(self._host_rng.integers(2**31)), xp)
        self.init_adapter(self._host_rng)

    # --- shape helpers ---------------------------------------------------------------------
    @property
    def xp(self):
        return backend.get_namespace(self.weight.data)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def dtype(self):
        return self.weight.dtype

    # --- random streams (resume state) -------------------------------------------------------
    def dropout_rng_state(self):
        """The dropout stream's state (JSON-able; None where the backend exposes none: CuPy)."""
        return self._dropout_rng.state

    def set_dropout_rng_state(self, state) -> None:
        self._dropout_rng.state = state

    def host_rng_state(self) -> dict:
        """The host stream's state (re-inits, reserve triplets, moment pruning draw from it)."""
        return self._host_rng.bit_generator.state

    def set_host_rng_state(self, state: dict) -> None:
        self._host_rng.bit_generator.state = state

    # --- the adapted map -------------------------------------------------------------------
    def dropout(self, x, dropout_mask=None):
        """``(x_d, mask)`` with mask the inverted-dropout multiplier, or ``None`` if inactive."""
        p = self.config.dropout
        if dropout_mask is None and (p == 0.0 or not self.training):
            return x, None
        if dropout_mask is None:
            return self._dropout_rng.compact_dropout(x, p)
        if tuple(dropout_mask.shape) != tuple(x.shape):
            raise ValueError(f"dropout_mask must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(dropout_mask.shape)}")
        return x * dropout_mask, backend.DropoutMask(dense=dropout_mask)

    def forward(self, x, dropout_mask=None):
        """``(y, cache)``; ``dropout_mask`` (x's shape, values 0 or 1/(1-p)) fixes dropout."""
        check_input(x, base := weight_operand(self.weight))
        if self.merged:
            y, _ = linear_forward(x, base, self._bias_data())
            return y, None
        return self.adapter_forward(x, dropout_mask)

    def backward(self, dy, cache, need_dx: bool = True):
        """Accumulate the adapter's gradients; return ``dx``, or ``None`` with ``need_dx=False``
        (the first layer of a model whose embeddings are frozen: dx is then never formed)."""
        if self.merged:
            raise RuntimeError("backward through a merged adapter: unmerge() before training")
        if getattr(dy, "ndim", 0) < 1 or dy.shape[-1] != self.out_features:
            raise ValueError(f"dy has shape {tuple(getattr(dy, 'shape', ()))}, the layer's "
                             f"output has shape (..., {self.out_features})")
        dx = self.adapter_backward(dy, cache, need_dx)
        if self.bias is not None and self.bias.trainable:
            self.bias.accumulate(dy.reshape(-1, self.out_features).sum(axis=0))
        return dx if need_dx else None

    def _bias_data(self):
        return None if self.bias is None else self.bias.data

    # --- the skeleton: dropout, effective weight, base product (docs/variants.md#dropout) -----
    def adapter_forward(self, x, dropout_mask):
        """The unmerged forward ``(y, AdapterCache)``. Without dropout x_d = x, so the map is
        one dense product with ``effective_weight()`` (m·n·r to form, against N·(m+n)·r and
        extra passes over y for the two-step path); with dropout, ``x W0ᵀ + b0 + Δy(x_d)``."""
        x_d, mask = self.dropout(x, dropout_mask)
        if (base := weight_operand(self.weight)) is not self.weight and mask is None:
            W_eff = self.effective_weight()                              # (m, n)
            y, _ = linear_forward(x, W_eff, self._bias_data())           # (..., m)
            return y, AdapterCache(x, x.reshape(-1, self.in_features), None, W_eff, None)
        y, _ = linear_forward(x, base, self._bias_data())               # (..., m)
        return y, self.add_correction(y, x, x_d, mask)

    def add_correction(self, y, x, x_d, mask) -> AdapterCache:
        """Add the dropout branch's correction ``Δy(x_d)`` into ``y (..., m)`` in place and
        return the cache (the low-rank map overrides this to skip the temporary)."""
        delta, cache = self._correction(x, x_d, mask)
        y += delta
        return cache

    def adapter_backward(self, dy, cache, need_dx: bool):
        """Accumulate adapter gradients; return dx (None when not needed). The base bias is
        handled by ``backward``."""
        if cache.W_eff is None:   # dx = G W0 + (dx_adapter ⊙ mask)
            dx = self.delta_backward(dy, cache, need_dx)
            return self.base_input_grad(dy, dx) if need_dx else None
        dy2 = dy.reshape(-1, self.out_features)                          # (N, m)
        self.correction_backward(dy2, cache, False)
        return (dy2 @ cache.W_eff).reshape(cache.x.shape) if need_dx else None   # (..., n)

    def base_input_grad(self, dy, dx_adapter):
        """``G W0 + dx_adapter`` (..., n), in dx_adapter's array: the dropout branch's dx."""
        if dx_adapter.flags.c_contiguous:   # then the (N, n) reshape is a view: add in place
            add_matmul(dx_adapter.reshape(-1, self.in_features),
                       dy.reshape(-1, self.out_features), weight_operand(self.weight))  # += G W0
        else:
            dx_adapter += dy @ self.weight.data                          # (..., n)
        return dx_adapter

    def masked_input_grad(self, dx_adapter, mask, shape):
        """``dx_adapter (N, n) ⊙ mask`` reshaped to the input's ``shape``."""
        dx = dx_adapter.reshape(shape)                                   # (..., n)
        return dx if mask is None else mask.apply(dx, in_place=True)

    def _correction(self, x, x_d, mask):
        x2 = x_d.reshape(-1, self.in_features)                           # (N, n)
        delta, state = self.correction_forward(x2)                       # (N, m)
        delta = delta.reshape(*x.shape[:-1], self.out_features)          # (..., m)
        return delta, AdapterCache(x, x2, mask, None, state)

    def effective_weight(self):
        """``W0 + ΔW`` (m, n), the weight the unmerged layer applies without dropout."""
        W_eff = self.delta_weight()                                      # (m, n)
        W_eff += self.weight.data
        return W_eff

    def correction_forward(self, x2):
        """``(Δy (N, m), state)``: the adapter's term of the dropout branch on ``x2 (N, n)``
        (the dropped-out input, flattened); ``state`` is the variant's, for its backward."""
        raise NotImplementedError(f"{type(self).__name__} supplies no correction_forward")

    def correction_backward(self, dy2, cache: AdapterCache, need_dx: bool):
        """Accumulate the adapter's gradients from ``dy2 (N, m)``; return its share of dx
        ``(N, n)`` before the dropout mask (None when ``need_dx`` is False). ``cache.state``
        is None in the effective-weight branch: recompute what it would hold."""
        raise NotImplementedError(f"{type(self).__name__} supplies no correction_backward")

    # --- the multi-adapter fast path (lowrank.multi, docs/training.md#multi-adapter) ---
    def has_delta_path(self) -> bool:
        """Whether ``delta_forward``/``delta_backward`` hold: the map is the *unchanged* base
        plus a correction from x alone. Default False (DoRA, RoSA): the caller falls back to
        ``forward``/``backward``."""
        return False

    def delta_forward(self, x, dropout_mask):
        """``(Δy, cache)`` with ``adapter_forward(x) = x W0ᵀ + b0 + Δy``; the caller forms
        the base product once for the rows of many adapters."""
        x_d, mask = self.dropout(x, dropout_mask)
        return self._correction(x, x_d, mask)

    def delta_backward(self, dy, cache: AdapterCache, need_dx: bool = True):
        """Accumulate the adapter's gradients; return dx minus ``dy W0`` (the caller's part)."""
        dy2 = dy.reshape(-1, self.out_features)                          # (N, m)
        dx = self.correction_backward(dy2, cache, need_dx)               # (N, n) or None
        return None if dx is None else self.masked_input_grad(dx, cache.mask, cache.x.shape)

    # --- merging ---------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the adapter into the base weight: later forwards run a plain linear."""
        if self.merged:
            raise RuntimeError("adapter is already merged; merging twice would add it twice")
        self.weight.data = self.merged_weight()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self.weight.data = self.unmerged_weight()
        self.merged = False

    def merged_weight(self):
        return self.weight.data + self.delta_weight()

    def unmerged_weight(self):
        return self.weight.data - self.delta_weight()

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, {self.config}"

    # --- what a variant supplies -------------------------------------------------------------
    @abstractmethod
    def init_adapter(self, rng) -> None:
        """Create the adapter's Parameters (host ``rng`` for initial values)."""

    @abstractmethod
    def delta_weight(self):
        """``ΔW (m, n)`` such that the unmerged forward equals ``x (W0 + ΔW)ᵀ + b0``."""

    def finite_difference_context(self):
        """The context in which finite differences of the forward see the function the
        backward differentiates. Default: no context (the backward is the full gradient)."""
        return contextlib.nullcontext()

    # --- training and reporting (lowrank.training.trainer, workflows, demo) ------------------------------
    @classmethod
    def layers_of(cls, model) -> list:
        """``[(module name, layer)]`` of the model's layers of this class, in model order."""
        return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]

    @classmethod
    def after_inject(cls, model, layers) -> None:
        """Called once by ``inject`` with the layers of this class it just built: ties what
        they share (VeRA's one projection pair). Default: nothing."""

    @classmethod
    def step_hook(cls, model):
        """The ``StepHook`` (lowrank.nn.hooks) the model's layers of this class need each step,
        or None (the default: nothing to do between steps)."""
        return None

    @classmethod
    def report(cls, model, out) -> "Report":
        """After training, over the model's layers of this class: lines (files under ``out``
        unless None) and per-module facts for tables (ranks kept, sparsity). Default: none."""
        return Report()

    # --- adapter files (lowrank.formats.adapter_dir, docs/training.md#adapter-files) -----------------
    peft_codec: ClassVar[object] = None   # its PEFT format (adapters/_peft.py); None: PEFT lacks it

    def saves_base_weight(self) -> bool:
        """Whether the file must keep W0 (``base_layer.weight``) because training rewrites it
        (ReLoRA's restarts). Default False: the base is the base model's."""
        return False

    def adapter_metadata(self) -> dict:
        """JSON-able per-module extras for adapter_config.json. Default: none."""
        return {}

    def load_adapter_metadata(self, extra: dict) -> None:
        """Restore what ``adapter_metadata`` saved, after the tensors are assigned."""

    def adapter_tensors(self) -> dict:
        """``{param name: array}`` saved in another shape than held (AdaLoRA's kept triplets)."""
        return {}

    def expand_adapter_tensors(self, tensors: dict, extra: dict) -> dict:
        """The inverse of ``adapter_tensors`` at load time: saved host arrays ``{param name:
        array}`` -> what to assign (may reshape the layer first). Default: ``tensors``."""
        return tensors
