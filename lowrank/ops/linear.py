"""``y = x Wᵀ + b`` on inputs of shape ``(..., n)``; ``W (m, n)``, ``b (m,)``."""
from __future__ import annotations

from .. import backend


def check_input(x, weight) -> None:
    """Reject x that would silently broadcast, promote, or mix backends with ``weight``."""
    backend.get_namespace(x, weight)  # raises on mixed backends
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have trailing size {weight.shape[1]} (in_features), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} does not match the layer dtype {weight.dtype}; "
                         "cast explicitly")


def linear_forward(x, weight, bias=None):
    """Returns ``(y, x)``: the cache is the input, all that weight/bias gradients need."""
    y = x @ weight.T                                   # (..., m)
    if bias is not None:
        y += bias
    return y, x


def linear_backward(dy, x, weight, need_dweight=True, need_dbias=True):
    """Returns ``(dx, dweight, dbias)``; gradients not asked for are ``None`` and never computed."""
    m, n = weight.shape
    dx = dy @ weight                                    # (..., n)
    dy2 = dy.reshape(-1, m)                             # (N, m)
    dweight = dy2.T @ x.reshape(-1, n) if need_dweight else None   # (m, n)
    dbias = dy2.sum(axis=0) if need_dbias else None     # (m,)
    return dx, dweight, dbias
