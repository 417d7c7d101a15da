"""``y = x Wᵀ + b`` on inputs of shape ``(..., n)``; ``W (m, n)``, ``b (m,)``.

Inputs are flattened to ``(N, n)`` first: NumPy runs a 2-D ``@`` as one BLAS call, while a
3-D ``@`` with a 2-D operand measured 15–25% slower here. With a bias on NumPy, the output
starts as the broadcast bias and BLAS adds the product into it (``blocked.affine``): no
separate pass to add the bias.

A frozen weight kept quantized (a GGUF base, docs/gguf.md#kept-quantized) is passed as its
parameter rather than an array: it multiplies tile by tile itself (``matmul_t``, ``matmul``)
so no float copy of the whole weight is formed; ``weight_operand`` picks which.
"""
from __future__ import annotations

from .. import backend
from ..backend.blocked import affine


def weight_operand(param):
    """What a product multiplies by: ``param.data``, or ``param`` itself when it multiplies
    in tiles (a quantized base kept in its blocks)."""
    return param if getattr(param, "multiplies_in_tiles", False) else param.data


def _tiled(weight) -> bool:
    return getattr(weight, "multiplies_in_tiles", False)


def check_input(x, weight) -> None:
    """Reject x that would silently broadcast, promote, or mix backends with ``weight``."""
    backend.get_namespace(x, weight.blocks if _tiled(weight) else weight)  # mixed backends
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have trailing size {weight.shape[1]} (in_features), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} does not match the layer dtype {weight.dtype}; "
                         "cast explicitly")


def linear_forward(x, weight, bias=None):
    """Returns ``(y, x)``: the cache is the input, all that weight/bias gradients need."""
    m, n = weight.shape
    if _tiled(weight):
        y = weight.matmul_t(x.reshape(-1, n), bias)     # (N, m)
        return y.reshape(*x.shape[:-1], m), x
    y = affine(x.reshape(-1, n), weight, bias)          # (N, m)
    return y.reshape(*x.shape[:-1], m), x               # (..., m)


def linear_backward(dy, x, weight, need_dweight=True, need_dbias=True, need_dx=True):
    """Returns ``(dx, dweight, dbias)``; gradients not asked for are ``None`` and never computed."""
    m, n = weight.shape
    dy2 = dy.reshape(-1, m)                             # (N, m)
    if need_dx:
        dx = weight.matmul(dy2) if _tiled(weight) else dy2 @ weight    # (N, n)
        dx = dx.reshape(*dy.shape[:-1], n)              # (..., n)
    else:
        dx = None
    dweight = dy2.T @ x.reshape(-1, n) if need_dweight else None   # (m, n)
    dbias = dy2.sum(axis=0) if need_dbias else None     # (m,)
    return dx, dweight, dbias
