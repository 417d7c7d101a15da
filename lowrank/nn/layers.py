"""Modules built from the functional ops: the plain ``Linear`` that adapters wrap."""
from __future__ import annotations

from .. import backend
from .module import Module, Parameter
from ..ops.linear import check_input, linear_backward, linear_forward, weight_operand


class Linear(Module):
    """``y = x Wᵀ + b`` with ``W (out_features, in_features)`` (the PyTorch layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 seed=0, dtype=backend.DEFAULT_DTYPE, xp=None, weight=None, bias_value=None):
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got "
                             f"{in_features}, {out_features}")
        if weight is None:
            # PyTorch's default: U(-1/sqrt(n), 1/sqrt(n)) for weight and bias
            bound = 1.0 / in_features ** 0.5
            rng = backend.host_rng(seed)
            weight = backend.host_uniform(rng, (out_features, in_features), -bound, bound, dtype, xp)
            if bias and bias_value is None:
                bias_value = backend.host_uniform(rng, (out_features,), -bound, bound, dtype, xp)
        if bias and bias_value is None:
            bias_value = backend.get_namespace(weight).zeros(weight.shape[0], weight.dtype)
        self.weight = Parameter(weight)
        self.bias = Parameter(bias_value) if bias else None

    @classmethod
    def from_arrays(cls, weight, bias=None):
        m, n = weight.shape
        return cls(n, m, bias is not None, weight=weight, bias_value=bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x):
        W = weight_operand(self.weight)
        check_input(x, W)
        return linear_forward(x, W, None if self.bias is None else self.bias.data)

    def backward(self, dy, cache, need_dx: bool = True):
        """``dx`` (``None`` with ``need_dx=False``: nothing below needs it)."""
        need_db = self.bias is not None and self.bias.trainable
        dx, dW, db = linear_backward(dy, cache, weight_operand(self.weight),
                                     need_dweight=self.weight.trainable, need_dbias=need_db,
                                     need_dx=need_dx)
        if dW is not None:
            self.weight.accumulate(dW)
        if db is not None:
            self.bias.accumulate(db)
        return dx
