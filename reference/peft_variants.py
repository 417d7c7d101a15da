"""PEFT as the oracle for VeRA, LoHa and LoKr on ``torch.nn.Linear`` layers.

``build`` wraps a stack of Linears (given weights) with PEFT's ``VeraConfig`` /
``LoHaConfig`` / ``LoKrConfig``; ``forward_backward`` copies given adapter arrays into PEFT's
parameters (lowrank uses PEFT's parameter names: ``vera_lambda_b``, ``hada_w1_a``,
``lokr_w2_b``, ...), runs PEFT's forward and torch autograd of ``L = Σ y ⊙ G``, and returns
host arrays. VeRA's dropout is made deterministic by swapping PEFT's dropout module for one
that multiplies by a fixed mask (LoHa and LoKr have no input dropout in PEFT).
No lowrank imports.
"""
from __future__ import annotations

import numpy as np
import torch

from .peft_dora import MaskDropout, _host, _numpy, _tensor

__all__ = ["build", "forward_backward", "adapter_state"]


class _Stack(torch.nn.Module):
    """Linears ``l0, l1, ...`` applied to the same input (each its own output)."""

    def __init__(self, weights, biases, dtype):
        super().__init__()
        for i, (W, b) in enumerate(zip(weights, biases)):
            m, n = W.shape
            lin = torch.nn.Linear(n, m, bias=b is not None, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(_tensor(W, dtype))
                if b is not None:
                    lin.bias.copy_(_tensor(b, dtype))
            setattr(self, f"l{i}", lin)

    def forward(self, x):
        return self.l0(x)


def build(variant: str, weights, biases, dtype=torch.float32, seed=0, **fields):
    """``(peft_model, [layer, ...])``: PEFT's ``variant`` adapter (its own init) on every
    Linear of the stack; ``fields`` go to the PEFT config (``r``, ``alpha``, ...)."""
    import peft

    weights = [_host(W) for W in weights]
    base = _Stack(weights, biases, dtype)
    targets = [f"l{i}" for i in range(len(weights))]
    if variant == "vera":
        config = peft.VeraConfig(target_modules=targets, **fields)
    elif variant == "loha":
        config = peft.LoHaConfig(target_modules=targets, **fields)
    elif variant == "lokr":
        config = peft.LoKrConfig(target_modules=targets, **fields)
    else:
        raise ValueError(f"no PEFT twin for {variant!r}")
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, config)
    return model, [getattr(model.base_model.model, t) for t in targets]


def adapter_state(layer, dtype=np.float64) -> dict:
    """``{PEFT parameter name: host array}`` of a PEFT adapter layer (adapter "default")."""
    out = {}
    for name in layer.adapter_layer_names:
        store = getattr(layer, name)
        if "default" in store:
            out[name] = _numpy(store["default"], dtype)
    return out


def forward_backward(layer, params: dict, x, G, mask=None, dtype=torch.float32) -> dict:
    """PEFT forward + autograd of ``L = Σ y ⊙ G`` with ``params`` ({name: array}) copied in.

    Returns ``y``, ``dx``, ``grads`` ({name: array}), ``delta`` (PEFT's get_delta_weight),
    ``merged`` (the base weight after PEFT's merge) and ``base_grad`` (None: W0 is frozen)."""
    npdtype = np.float32 if dtype == torch.float32 else np.float64
    with torch.no_grad():
        for name, value in params.items():
            getattr(layer, name)["default"].copy_(_tensor(value, dtype))
    if mask is not None:
        layer.vera_dropout["default"] = MaskDropout(_tensor(mask, dtype))
    layer.train()
    xt = _tensor(x, dtype).requires_grad_(True)
    y = layer(xt)
    for p in layer.parameters():
        p.grad = None
    (y * _tensor(G, dtype)).sum().backward()
    grads = {name: _numpy(getattr(layer, name)["default"].grad, npdtype) for name in params}
    with torch.no_grad():
        delta = _numpy(layer.get_delta_weight("default"), npdtype)
        layer.merge()
        merged = _numpy(layer.get_base_layer().weight, npdtype)
        layer.unmerge()
    return {"y": _numpy(y, npdtype), "dx": _numpy(xt.grad, npdtype), "grads": grads,
            "delta": delta, "merged": merged,
            "base_grad": layer.get_base_layer().weight.grad}
