"""Central finite differences and a host-side relative error (no lowrank imports)."""
from __future__ import annotations

import numpy as np

__all__ = ["numerical_gradient", "rel_error"]


def numerical_gradient(f, array, eps=1e-6):
    """``∂f/∂array`` by central differences, as a float64 host array of ``array.shape``.

    ``f()`` takes no arguments and returns a Python float computed from the *current* contents
    of ``array``; each entry is perturbed in place (``array[idx] = value`` with Python floats,
    which NumPy, CuPy and the strict stand-in all accept) and restored exactly afterwards.
    """
    grad = np.zeros(tuple(array.shape), dtype=np.float64)
    for idx in np.ndindex(*grad.shape):
        orig = float(array[idx])
        try:
            array[idx] = orig + eps
            f_plus = float(f())
            array[idx] = orig - eps
            f_minus = float(f())
        finally:
            array[idx] = orig
        grad[idx] = (f_plus - f_minus) / (2.0 * eps)
    return grad


def _host64(a):
    if hasattr(a, "get") and not isinstance(a, np.ndarray):   # cupy.ndarray and look-alikes
        a = a.get()
    if hasattr(a, "detach"):                                    # torch tensors
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def rel_error(a, b) -> float:
    """``‖a − b‖ / max(‖a‖, ‖b‖, 1e-300)`` in float64 on the host."""
    a, b = _host64(a), _host64(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)), 1e-300)
    return float(np.linalg.norm(a - b) / scale)
