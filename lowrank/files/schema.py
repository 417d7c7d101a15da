"""The shapes of lowrank's JSON files, checked before any field is used (host-side I/O,
docs/training.md#checkpoints): a ``[]`` where an object belongs, a string where a list of
module names belongs or a size of 10¹² is one ``ValueError`` naming the file and field.

A spec is a type (or tuple of types; ``None`` allows null), a dict ``{"key": spec}`` (a key
ending in ``?`` may be absent; other keys are allowed), ``[spec]`` (a list of such items),
``{str: spec}`` (a dict of any keys), or a callable returning an error string or ``None``.
"""
from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def check(obj, spec, where: str):
    """``obj`` if it fits ``spec``; else ValueError ``"<where>: <field> ..."``."""
    _check(obj, spec, where, "")
    return obj


def _fail(where, field, text):
    raise ValueError(f"{where}: {'field ' + repr(field) + ' ' if field else ''}{text}")


def _check(obj, spec, where, field):
    if isinstance(spec, at_most):
        if isinstance(obj, (list, dict)) and len(obj) > spec.n:
            _fail(where, field, f"holds {len(obj):,} entries, more than the {spec.n:,} allowed")
        _check(obj, spec.spec, where, field)
    elif callable(spec) and not isinstance(spec, type):
        problem = spec(obj)
        if problem:
            _fail(where, field, problem)
    elif isinstance(spec, dict) and list(spec) == [str]:
        if not isinstance(obj, dict):
            _fail(where, field, f"must be an object, got {type(obj).__name__}")
        for k, v in obj.items():
            _check(v, spec[str], where, f"{field}.{k}" if field else k)
    elif isinstance(spec, dict):
        if not isinstance(obj, dict):
            _fail(where, field, f"must be an object, got {type(obj).__name__}")
        for key, sub in spec.items():
            name = key.rstrip("?")
            path = f"{field}.{name}" if field else name
            if name not in obj:
                if not key.endswith("?"):
                    _fail(where, path, "is missing")
                continue
            _check(obj[name], sub, where, path)
    elif isinstance(spec, list):
        if not isinstance(obj, list):
            _fail(where, field, f"must be a list, got {type(obj).__name__}")
        for i, item in enumerate(obj):
            _check(item, spec[0], where, f"{field}[{i}]")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        types = tuple(type(None) if t is None else t for t in types)
        if isinstance(obj, bool) and bool not in types:
            _fail(where, field, f"must be {_names(types)}, got {obj!r}")
        if not isinstance(obj, types):
            _fail(where, field, f"must be {_names(types)}, got {type(obj).__name__}")


def _names(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def int_in(low: int, high: int):
    def test(v):
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            return f"must be an integer in [{low}, {high}], got {v!r}"
    return test


def module_name(v):
    if not isinstance(v, str) or (v and not NAME.fullmatch(v)):
        return f"must be a module name (letters, digits, _ and .), got {v!r}"


MAX_MODULES = 1 << 16   # a model's Linear modules: a longer list names modules twice or none


class at_most:   # noqa: N801 - a spec, named like the others
    """``spec`` for a list or dict of at most ``n`` entries: the count is checked before any
    entry is."""

    def __init__(self, n: int, spec):
        self.n, self.spec = n, spec


def hex32(v):
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{32}", v):
        return f"must be a save id (32 hex digits), got {v!r}"


def MODEL_SIZE(v):   # noqa: N802 - a spec, named like the others
    """A saved model config's value: any JSON scalar, integers (sizes) at most 2**22; the
    sizes' products are bounded by the weights file (``checkpoint._check_fits_file``)."""
    if isinstance(v, int) and not isinstance(v, bool) and not -1 <= v <= 1 << 22:
        return f"must be a size in [-1, {1 << 22}], got {v}"
    if isinstance(v, (list, dict)):
        return f"must be a number, string, bool or null, got a {type(v).__name__}"

TRAIN_STATE = {"step": int_in(0, 1 << 62), "tokens_seen?": int_in(0, 1 << 62),
               "rng?": dict, "optimizer?": dict, "dropout_rngs?": dict, "hooks?": list,
               "extra?": dict}

_SAVE = {"format": str, "lowrank_version?": str, "train_state?": (dict, None),
         "files?": {str: hex32}, "integrity": dict}

MODEL_CONFIG_SCHEMA = {**_SAVE, "model?": dict, "dtype?": (str, None)}

ADAPTER_MODULE = {"variant": str, "config": dict, "in_features": int_in(1, 1 << 20),
                  "out_features": int_in(1, 1 << 20), "dtype?": str, "merged?": bool,
                  "params?": {str: [int_in(0, 1 << 31)]}, "extra?": dict}

ADAPTER_CONFIG_SCHEMA = {**_SAVE, "variant": str, "config": (dict, None),
                       "targets": at_most(MAX_MODULES, [module_name]),
                       "modules": at_most(MAX_MODULES, {str: ADAPTER_MODULE})}

RUN_KINDS = ("base", "full", "adapter", "multi")
RUN_SCHEMA = {"kind?": lambda v: None if v in RUN_KINDS else f"must be one of {RUN_KINDS}, got {v!r}",
            "base?": str, "base_path?": str, "variant?": str,
            "targets?": at_most(MAX_MODULES, (list, str)),
            "config?": (dict, None),
            "data?": dict, "train?": {"seed?": int_in(0, 1 << 63)}, "history?": [dict],
            "tokenizer_sha256?": str, "base_sha256?": str,
            "quantize?": lambda v: None if v in (None, "nf4", "keep") else
            f"must be null, 'nf4' or 'keep', got {v!r}"}
