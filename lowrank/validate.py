"""Field checks shared by configs: a number that cannot work is a ValueError naming the field,
before it can turn into a NaN many steps later (docs/conventions.md#configs)."""
from __future__ import annotations

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
