"""lowrank — LoRA and its variants with hand-derived, verified gradients, on NumPy or CuPy."""
from . import adapters, backend, decompose, ops
from .layers import Linear
from .module import Module, Parameter

__version__ = "0.1.0"
__all__ = ["adapters", "backend", "decompose", "ops", "Linear", "Module", "Parameter"]
