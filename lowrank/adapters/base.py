"""What every adapter shares: the config base class, the registry, and ``AdaptedLinear``.

A variant is one file that defines a config dataclass and an ``AdaptedLinear`` subclass and
registers both under its name (``@register("lora", LoraConfig)``). The contract tests in
``tests/test_adapter_contract.py`` then run over it automatically.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

from .. import backend
from ..module import Module, Parameter
from ..ops.linear import check_input, linear_forward
from ..validate import MAX_ALPHA, check_number, check_seed, config_error

BIAS_MODES = ("none", "lora_only", "all")
_REGISTRY: dict[str, tuple[type, type]] = {}


def check_int(name: str, value, low: int, optional: bool = False):
    """Validate a config field that must be an integer >= ``low`` (``None`` allowed when
    ``optional``); returns it. The message starts with the field's name."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def field_from_text(key: str, text: str) -> tuple[str, object]:
    """A config field given on the command line: ``("init-r", "12")`` -> ``("init_r", 12)``;
    values that parse as JSON (numbers, true/false, lists) become those, others stay strings."""
    import json
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.replace("-", "_"), value


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


def config(name: str, **kwargs) -> AdapterConfig:
    """``config("lora", r=8, alpha=16, ...)``: the validated config of a registered variant."""
    config_cls, _ = _lookup(name)
    names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for variant {name!r}; fields: {sorted(names)}")
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:   # one that names no field gets the field's name
        raise config_error(config_cls, kwargs, exc) from None


def config_from_dict(data: dict) -> AdapterConfig:
    data = dict(data)
    return config(data.pop("variant"), **data)


class AdaptedLinear(Module, metaclass=ABCMeta):
    """A frozen linear ``(W0, b0)`` plus a trainable adapter that owns the whole adapted map.

    ``AdaptedLinear(W0, b0, cfg, seed)`` builds the registered subclass for ``cfg.variant``.
    ``W0`` and ``b0`` are copied: an init that rewrites the base (PiSSA, OLoRA, ...) never
    touches the caller's arrays. Subclasses implement ``init_adapter``, ``adapter_forward``,
    ``adapter_backward`` and ``delta_weight``.
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
        self.need_input_grad = True   # see backward(need_dx=...)
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

    # --- the adapted map -------------------------------------------------------------------
    def dropout(self, x, dropout_mask=None):
        """``(x_d, mask)`` with mask the inverted-dropout multiplier, or ``None`` if inactive."""
        p = self.config.dropout
        if dropout_mask is None and (p == 0.0 or not self.training):
            return x, None
        if dropout_mask is None:
            dropout_mask = self._dropout_rng.keep_mask(x.shape, p, x.dtype)
        elif tuple(dropout_mask.shape) != tuple(x.shape):
            raise ValueError(f"dropout_mask must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(dropout_mask.shape)}")
        return x * dropout_mask, dropout_mask

    def forward(self, x, dropout_mask=None):
        """``(y, cache)``; ``dropout_mask`` (x's shape, values 0 or 1/(1-p)) fixes dropout."""
        check_input(x, self.weight.data)
        if self.merged:
            y, _ = linear_forward(x, self.weight.data, self._bias_data())
            return y, None
        return self.adapter_forward(x, dropout_mask)

    def backward(self, dy, cache, need_dx: bool = True):
        """Accumulate the adapter's gradients; return ``dx``, or ``None`` with ``need_dx=False``
        (the first layer of a model whose embeddings are frozen). A variant may skip forming
        dx while ``self.need_input_grad`` is False (LoRA does); the others compute it anyway."""
        if self.merged:
            raise RuntimeError("backward through a merged adapter: unmerge() before training")
        if getattr(dy, "ndim", 0) < 1 or dy.shape[-1] != self.out_features:
            raise ValueError(f"dy has shape {tuple(getattr(dy, 'shape', ()))}, the layer's "
                             f"output has shape (..., {self.out_features})")
        self.need_input_grad = need_dx
        try:
            dx = self.adapter_backward(dy, cache)
        finally:
            self.need_input_grad = True
        if self.bias is not None and self.bias.trainable:
            self.bias.accumulate(dy.reshape(-1, self.out_features).sum(axis=0))
        return dx if need_dx else None

    def _bias_data(self):
        return None if self.bias is None else self.bias.data

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
    def adapter_forward(self, x, dropout_mask):
        """The unmerged forward: ``(y, cache)``."""

    @abstractmethod
    def adapter_backward(self, dy, cache):
        """Accumulate adapter gradients, return ``dx``; the base bias is handled by the caller."""

    @abstractmethod
    def delta_weight(self):
        """``ΔW (m, n)`` such that the unmerged forward equals ``x (W0 + ΔW)ᵀ + b0``."""
