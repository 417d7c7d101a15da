"""Field checks shared by configs: a number that cannot work is a ValueError naming the field,
before it can turn into a NaN many steps later."""
from __future__ import annotations

import dataclasses
import json
import math

# Far above any useful LoRA alpha, far below float32's 3.4e38: alpha·x·B·A stays finite.
MAX_ALPHA = 1e6


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """``float(value)`` if it is a finite real number in [low, high] (``(low, high]`` with
    ``low_open``); else ValueError starting with ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value!r}")
    return value


def check_seed(value, name: str = "seed") -> int:
    """A seed: an integer in [0, 2**63)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")
    return value


def _kind_problem(default, value) -> str | None:
    """What ``value`` should be, judged by the field's ``default``; ``None`` if it fits."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a bool"
    if isinstance(default, int):   # None: some counts default to another field
        ok = value is None or isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "an integer"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value)
        return None if ok else "a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    return None


def config_error(config_cls, kwargs: dict, exc: Exception) -> ValueError:
    """A config's own check failed (``exc``): the same error when it names a field, else a
    ValueError naming the first field whose value is not of its default's kind (a TypeError
    from ``float(None)`` deep in a variant's checks says nothing of which field it was)."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    if isinstance(exc, ValueError) and any(str(exc).startswith(n) for n in names):
        return exc
    for f in dataclasses.fields(config_cls):
        if f.name in kwargs:
            problem = _kind_problem(f.default, kwargs[f.name])
            if problem:
                return ValueError(f"{f.name} must be {problem}, got {kwargs[f.name]!r}")
    return ValueError(f"{getattr(config_cls, 'variant', '')} config {kwargs}: "
                      f"{type(exc).__name__}: {exc}")


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
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.replace("-", "_"), value


def near_fields(unknown, names) -> str:
    """``"; did you mean 'alpha'?"`` for misspelt field names (or "" when none is near)."""
    import difflib
    near = [m[0] for u in unknown for m in [difflib.get_close_matches(u, sorted(names), 1, 0.6)]
            if m]
    return f"; did you mean {', '.join(map(repr, near))}?" if near else ""
