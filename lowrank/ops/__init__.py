"""Functional forward/backward pairs (llm.c style): ``*_forward`` returns ``(out, cache)``."""
from .linear import linear_forward, linear_backward, check_input

__all__ = ["linear_forward", "linear_backward", "check_input"]
