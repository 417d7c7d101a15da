"""What a variant needs to own its PEFT format (docs/peft.md#codecs): the ``PeftCodec`` it
sets as ``peft_codec`` on its layer class, the low-rank ``Piece`` that GPT-2's fused ``c_attn``
is built from, and the config schema's field checks.

A variant PEFT has writes one ``PeftCodec`` subclass in its own file: the PEFT type, the
config fields of that type (each with its check; a field lowrank does not implement carries
the value under which it changes nothing), the tensor keys of one module, and the two
conversions (``save``: layers -> PEFT tensors and fields; ``load_module``: one PEFT module ->
lowrank layer configs and arrays). What is model-specific (GPT-2's fused ``c_attn``, names)
and the directory I/O stay in ``lowrank.formats.peft_names`` / ``lowrank.formats.peft_dir``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
import re
from collections import Counter
from typing import ClassVar, NamedTuple

import numpy as np

PEFT_PREFIX = "base_model.model."
MAX_RANK = 1 << 16       # far above any adapter rank; refuses 10**12 before anything is sized
# The largest magnitude a file's tensor may hold: float32 overflows at 3.4e38 ≈ 2**128, and
# 2**32 in A and in B leaves 2**64 for the rank sum, the scaling, the activations and the
# inner dimension (2**16 each) before a product overflows. Trained adapters hold values
# below 10**3; 3e38 passes isfinite and still gives inf in the first product.
MAX_MAGNITUDE = 2.0 ** 32
_NO_DEFAULT = object()


class Piece(NamedTuple):
    """One low-rank layer in PEFT's terms (host float arrays), what a fused c_attn stacks."""

    kind: str          # "lora", "dora", "adalora"
    A: np.ndarray      # (r, n) (AdaLoRA: the saved triplets only)
    B: np.ndarray      # (m, r)
    scale: float       # s (AdaLoRA: c = α / (init_r + 1e-5))
    E: object = None   # (r,) AdaLoRA
    mag: object = None  # (m,) DoRA
    pattern: tuple = ()  # AdaLoRA: which of the init_r triplets are saved


class Field(NamedTuple):
    """One PEFT config field: ``check(name, value) -> value`` (raises ValueError naming the
    field); ``noop``: a field lowrank does not implement, accepted only at this value."""

    check: object
    noop: object = _NO_DEFAULT   # a tuple: any of these values


class PeftCodec(ABC):
    """The PEFT format of one variant. Class attributes describe it; the methods convert."""

    peft_type: ClassVar[str] = ""
    fused: ClassVar[bool] = False          # q/k/v pieces can fuse into GPT-2's c_attn
    wraps_conv1d: ClassVar[bool] = True    # PEFT wraps GPT-2's Conv1D layers with this type
    fields: ClassVar[dict] = {}            # this type's config fields: name -> Field
    module_keys: ClassVar[tuple] = ()      # tensor key suffixes of one module
    shared_keys: ClassVar[dict] = {}       # full keys shared by every module -> index

    def claims(self, info: dict) -> bool:
        """Whether this codec reads the (validated) config (LORA: use_dora picks DoRA)."""
        return True

    def check_config(self, info: dict, where: str) -> None:
        """Checks across fields, after each field passed its own."""

    def piece(self, layer, original_weight) -> Piece:
        """The layer as a ``Piece`` (``fused`` codecs only); ``original_weight()`` is the base
        weight before a data-driven init rewrote it."""
        raise TypeError(f"{type(self).__name__} is not a fused codec: it has no pieces")

    @abstractmethod
    def save(self, items: dict, cfg) -> tuple[dict, dict]:
        """``({full PEFT key: array}, config fields)`` of ``items``: ``{PEFT
        module name: Piece}`` for fused codecs, ``{PEFT module name: layer}`` otherwise."""

    @abstractmethod
    def load_module(self, peft_name: str, found: dict, info: dict, parts: list,
                    where: str) -> list:
        """``[(lowrank name, variant, config fields, {param: host array}, extra)]`` of one
        PEFT module's tensors ``found`` (suffix -> array); ``parts``: ``[(lowrank name,
        part of a fused c_attn or None)]``."""

    def after_load(self, layers: list, shared: dict, where: str) -> None:
        """Tie what the new layers share (VeRA's projections). Default: nothing."""


class ParamCodec(PeftCodec):
    """A PEFT type whose tensors are the layer's own parameters under their own names
    (``base_model.model.<module>.<parameter>``: VeRA, LoHa, LoKr). GPT-2's fused c_attn has
    no exact counterpart for them (docs/peft.md#vera-loha-lokr)."""

    variant: ClassVar[str] = ""
    required: ClassVar[tuple] = ()      # keys every module has (LoKr's depend on the config)

    def save(self, items, cfg):
        tensors = {f"{PEFT_PREFIX}{name}.{pname}": p.data
                   for name, layer in items.items() for pname, p in layer.named_parameters()
                   if pname in self.module_keys}
        return tensors, self.config_fields(items, cfg)

    @abstractmethod
    def config_fields(self, items: dict, cfg) -> dict:
        """PEFT's config fields of the saved ``items``."""

    @abstractmethod
    def module_fields(self, peft_name: str, info: dict) -> dict:
        """The lowrank config fields of one module."""

    def load_module(self, peft_name, found, info, parts, where):
        if len(parts) > 1 or parts[0][1] is not None:
            raise ValueError(f"{where}: module {peft_name!r}: a {self.peft_type} adapter on "
                             "GPT-2's fused c_attn cannot be split into q, k, v "
                             "(docs/peft.md#vera-loha-lokr)")
        for key in self.required:
            if key not in found:
                raise missing_tensor(where, peft_name, key)
        return [(parts[0][0], self.variant, self.module_fields(peft_name, info), dict(found),
                 {})]


def common_ranks(items: dict) -> dict:
    """LoHa/LoKr's ``r``, ``alpha`` and their patterns: the most common value is global."""
    ranks = {n: layer.config.r for n, layer in items.items()}
    alphas = {n: layer.config.alpha for n, layer in items.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "alpha": alpha,
            "rank_pattern": {n: k for n, k in ranks.items() if k != r},
            "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha}}


def codec_for(info: dict, codecs) -> PeftCodec | None:
    """The codec among ``codecs`` that reads this PEFT config, or None."""
    return next((c for c in codecs if c.peft_type == info.get("peft_type") and c.claims(info)),
                None)


FUSED_PARTS = 3   # GPT-2's c_attn: q, k, v


def row_blocks(parts: list, rows: int) -> list:
    """``[(lowrank name, row slice)]``: the whole rows for one module, or each part's third of
    a fused c_attn's ``rows``."""
    if len(parts) == 1 and parts[0][1] is None:
        return [(parts[0][0], slice(None))]
    third = rows // FUSED_PARTS
    return [(name, slice(part * third, (part + 1) * third)) for name, part in parts]


def kept(pattern) -> np.ndarray:
    """Indices of the true entries of a host bool pattern."""
    return np.flatnonzero(np.asarray(pattern, dtype=bool))


def scatter(saved, keep, size: int, axis: int) -> np.ndarray:
    """A host array with ``size`` entries along ``axis``, ``saved`` at ``keep``, zeros
    elsewhere (AdaLoRA's pruned triplets back to init_r)."""
    shape = list(saved.shape)
    shape[axis] = size
    full = np.zeros(shape, saved.dtype)
    full[(slice(None),) * axis + (keep,)] = saved
    return full


def pattern_value(patterns: dict, name: str, default):
    """PEFT's lookup of a per-module pattern (rank_pattern / alpha_pattern): the key is a
    regex matched as a suffix of the module name (``(.*\\.)?key$``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def missing_tensor(where, peft_name, key) -> ValueError:
    return ValueError(f"{where}: module {peft_name!r} has no {key!r} tensor (the file is "
                      "incomplete)")


def data_driven_piece(A, B, s: float, W0, W_base) -> tuple:
    """A PiSSA/OLoRA/MiLoRA LoRA over the original ``W0`` (docs/peft.md#pissa): the layer
    holds ``W_base = W0 - s·B0A0`` and ``(A', B')``, so ``ΔW = s(B'A' - B0A0)`` is the rank-2r
    LoRA ``[A'; A0]``, ``[B', -B0]``; ``B0A0 = (W0 - W_base)/s`` has rank r, and its top-r
    SVD gives the factors (float64 on the host)."""
    r = A.shape[0]
    D = (np.asarray(W0, np.float64) - np.asarray(W_base, np.float64)) / s       # (m, n)
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    root = np.sqrt(S[:r])
    B0, A0 = U[:, :r] * root, root[:, None] * Vt[:r]                            # (m, r), (r, n)
    return (np.concatenate([A, A0.astype(A.dtype)]),                            # (2r, n)
            np.concatenate([B, -B0.astype(B.dtype)], axis=1))                   # (m, 2r)


# --- tensors --------------------------------------------------------------------------------

def check_tensors(tensors: dict, where) -> None:
    """Every tensor of an adapter file floating-point, finite and at most ``MAX_MAGNITUDE``
    in magnitude, before any of it is attached: one line naming the file and the key."""
    for key, array in tensors.items():
        a = np.asarray(array)
        if a.dtype.kind != "f":
            raise ValueError(f"{where}: tensor {key!r} has dtype {a.dtype}; adapter weights "
                             "are floating point")
        if a.size == 0:
            continue
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: tensor {key!r} holds NaN or Inf")
        peak = float(np.abs(a).max())
        if peak > MAX_MAGNITUDE:
            raise ValueError(f"{where}: tensor {key!r} holds {peak:.3g}, beyond the "
                             f"{MAX_MAGNITUDE:.3g} an adapter weight can hold without its "
                             "products overflowing")


# --- config field checks (each returns the value or raises naming the field) ----------------

def _fail(name, value, what):
    raise ValueError(f"field {name!r} must be {what}, got {value!r}")


def integer(low: int, high: int):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            _fail(name, value, f"an integer in [{low}, {high}]")
        return value
    return check


def number(low: float, high: float, low_open: bool = False, high_open: bool = False):
    def check(name, value):
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and \
            math.isfinite(value) and (low < value if low_open else low <= value) and \
            (value < high if high_open else value <= high)
        if not ok:
            _fail(name, value, f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                               f"{')' if high_open else ']'}")
        return value
    return check


def boolean(name, value):
    if not isinstance(value, bool):
        _fail(name, value, "true or false")
    return value


def bools(name, value):
    if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
        _fail(name, value, "a list of true/false")
    return value


def one_of(*choices):
    def check(name, value):
        if not any(type(value) is type(c) and value == c for c in choices):   # True is not 1
            _fail(name, value, f"one of {list(choices)}")
        return value
    return check


def optional(inner):
    def check(name, value):
        return None if value is None else inner(name, value)
    return check


def text(name, value):
    if not isinstance(value, str):
        _fail(name, value, "a string")
    return value


def _regex(name, value):
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        _fail(name, value, f"a valid regular expression ({exc})")
    return value


def names(name, value):
    """A non-empty list of module names (or a list PEFT reads as one), each a string."""
    if not isinstance(value, list) or not value or \
            not all(isinstance(v, str) and v for v in value):
        _fail(name, value, "a non-empty list of module names")
    return value


def targets(name, value):
    """PEFT's ``target_modules``: a non-empty list of names, or one regex string."""
    if isinstance(value, str):
        return _regex(name, value)
    return names(name, value)


def pattern_dict(inner):
    """``rank_pattern`` / ``alpha_pattern``: ``{regex: value}``, each key a valid regex."""
    def check(name, value):
        if not isinstance(value, dict):
            _fail(name, value, "a dict of {module pattern: value}")
        for key, v in value.items():
            _regex(f"{name} key", key)
            inner(f"{name}[{key!r}]", v)
        return value
    return check


def anything(name, value):
    return value


TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
# Fields of every PEFT config (peft's PeftConfig and the tuner configs that all share them).
COMMON_FIELDS = {
    "peft_type": Field(text),
    "task_type": Field(optional(one_of(*TASK_TYPES))),
    "auto_mapping": Field(optional(anything)),   # which auto class PEFT opens: no output
    "peft_version": Field(optional(text)),
    "base_model_name_or_path": Field(optional(text)),
    "revision": Field(optional(text)),
    "inference_mode": Field(boolean),
    "target_modules": Field(targets),
    "modules_to_save": Field(optional(names)),
    "layers_to_transform": Field(anything, None),
    "layers_pattern": Field(anything, None),
}


def validate_config(info, where, codecs) -> PeftCodec:
    """A PEFT ``adapter_config.json`` checked whole, before anything is read by it: every
    field known for its type (unknown ones refused by name), of its type and range, fields
    lowrank does not implement at their no-op value; returns the codec that reads it."""
    if not isinstance(info, dict):
        raise ValueError(f"{where}: a PEFT config is a JSON object, got {type(info).__name__}")
    kind = info.get("peft_type")
    typed = [c for c in codecs if c.peft_type == kind]
    if not typed:
        known = sorted({c.peft_type for c in codecs}, key=lambda t: (t != "LORA", t))
        raise ValueError(f"{where}: holds a PEFT {kind} adapter; lowrank reads "
                         f"{', '.join(known)} adapters")
    spec = {**COMMON_FIELDS, **typed[0].fields}
    if "target_modules" not in info:
        raise ValueError(f"{where}: field 'target_modules' is missing")
    for name, value in info.items():
        field = spec.get(name)
        if field is None:
            raise ValueError(f"{where}: unknown field {name!r} in a PEFT {kind} config")
        try:
            field.check(name, value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        allowed = field.noop if isinstance(field.noop, tuple) else (field.noop,)
        if field.noop is not _NO_DEFAULT and \
                not any(type(value) is type(a) and value == a for a in allowed):
            raise ValueError(f"{where}: PEFT field {name!r} = {value!r} is not supported: it "
                             f"changes PEFT's outputs (lowrank reads {allowed[0]!r} only)")
    codec = codec_for(info, typed)
    codec.check_config(info, where)
    return codec
