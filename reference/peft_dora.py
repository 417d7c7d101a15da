"""PEFT as the DoRA oracle: ``LoraConfig(use_dora=True)`` on one ``torch.nn.Linear``.

The given weights (base ``W0``/``b0``, ``lora_A``, ``lora_B`` and the magnitude) replace whatever
PEFT initialised, so every number is PEFT's forward (its detached weight norm, its dropout form)
and torch autograd through it. Dropout is made deterministic by swapping PEFT's
``lora_dropout`` module for one that multiplies by a given inverted-dropout mask; PEFT then takes
its dropout branch (``base_result = None``: the base term is recomputed from the dropped input).
No lowrank imports.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["MaskDropout", "build_peft_dora_linear", "peft_dora_forward_backward"]


def _host(a):
    if hasattr(a, "get") and not isinstance(a, np.ndarray):    # cupy / strict arrays
        a = a.get()
    return np.array(a, dtype=np.float64)


def _tensor(a, dtype):
    return torch.as_tensor(_host(a), dtype=dtype).clone()


def _numpy(t, dtype):
    return None if t is None else t.detach().cpu().numpy().astype(dtype)


class MaskDropout(torch.nn.Module):
    """``x ⊙ mask``: a dropout whose mask is fixed (x's shape, values 0 or 1/(1-p))."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


class _OneLinear(torch.nn.Module):
    def __init__(self, m, n, has_bias, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(n, m, bias=has_bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def build_peft_dora_linear(W0, b0, r, alpha, rslora=False, dropout=0.0, dtype=torch.float32,
                           seed=0):
    """``(peft_model, lora_layer)``: PEFT DoRA around ``Linear(W0, b0)`` (PEFT's own init)."""
    from peft import LoraConfig, get_peft_model

    W0 = _host(W0)
    m, n = W0.shape
    base = _OneLinear(m, n, b0 is not None, dtype)
    with torch.no_grad():
        base.proj.weight.copy_(_tensor(W0, dtype))
        if b0 is not None:
            base.proj.bias.copy_(_tensor(b0, dtype))
    config = LoraConfig(target_modules=["proj"], r=int(r), lora_alpha=alpha, use_dora=True,
                        use_rslora=bool(rslora), lora_dropout=float(dropout))
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    return model, model.base_model.model.proj


def peft_dora_forward_backward(W0, b0, A, B, magnitude, r, alpha, x, G, mask=None,
                               rslora=False, dtype=torch.float32) -> dict:
    """PEFT DoRA forward + autograd backward of ``L = Σ y ⊙ G`` with the given weights.

    ``mask`` (x's shape) switches PEFT's dropout branch on with that fixed mask. Returns host
    arrays in ``dtype``'s NumPy precision: ``y``, ``dA``, ``dB``, ``dm`` (the magnitude's grad),
    ``dx``; ``magnitude_init`` (PEFT's own init of m from W0, before it is replaced),
    ``merged`` (the base weight after PEFT's ``merge()``, from the given weights),
    ``unmerged`` (after ``unmerge()``), ``scaling`` and ``frozen_weight_grad``.
    """
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    model, layer = build_peft_dora_linear(W0, b0, r, alpha, rslora,
                                          dropout=0.0 if mask is None else 0.5, dtype=dtype)
    model.train()
    base = layer.get_base_layer()
    magnitude_layer = layer.lora_magnitude_vector["default"]
    magnitude_init = _numpy(magnitude_layer.weight, np_dtype)
    if mask is not None:
        layer.lora_dropout["default"] = MaskDropout(_tensor(mask, dtype))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(_tensor(A, dtype))
        layer.lora_B["default"].weight.copy_(_tensor(B, dtype))
        magnitude_layer.weight.copy_(_tensor(magnitude, dtype))
    xt = _tensor(x, dtype).requires_grad_(True)
    y = model(xt)
    (y * _tensor(G, dtype)).sum().backward()
    out = {
        "y": _numpy(y, np_dtype),
        "dA": _numpy(layer.lora_A["default"].weight.grad, np_dtype),
        "dB": _numpy(layer.lora_B["default"].weight.grad, np_dtype),
        "dm": _numpy(magnitude_layer.weight.grad, np_dtype),
        "dx": _numpy(xt.grad, np_dtype),
        "magnitude_init": magnitude_init,
        "scaling": float(layer.scaling["default"]),
        "frozen_weight_grad": base.weight.grad is not None,
    }
    with torch.no_grad():
        layer.merge()
        out["merged"] = _numpy(base.weight, np_dtype)
        layer.unmerge()
        out["unmerged"] = _numpy(base.weight, np_dtype)
    return out
