"""PEFT (huggingface/peft) as the oracle: LoRA on one ``torch.nn.Linear``, numbers out as NumPy.

The layer under test is wrapped as ``_OneLinear.proj`` and adapted with
``LoraConfig(target_modules=["proj"], ...)``, so every number here is PEFT's own: its
initialisation (kaiming / gaussian / PiSSA / OLoRA, including the residual it writes back into
the base weight), its scaling (α/r or α/√r with ``use_rslora``), and its forward; gradients
come from torch autograd through PEFT's forward.

Init names follow lowrank's config (``"kaiming"`` is PEFT's ``init_lora_weights=True``).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["peft_init_name", "build_peft_linear", "peft_init", "peft_forward_backward"]


def peft_init_name(init):
    """lowrank init name -> PEFT ``init_lora_weights`` value."""
    return True if init in ("kaiming", True) else init


def _host(a):
    if hasattr(a, "get") and not isinstance(a, np.ndarray):    # cupy / strict arrays
        a = a.get()
    return np.array(a, dtype=np.float64)


def _tensor(a, dtype):
    return None if a is None else torch.as_tensor(_host(a), dtype=dtype).clone()


def _numpy(t, dtype=np.float64):
    return None if t is None else t.detach().cpu().numpy().astype(dtype)


class _OneLinear(torch.nn.Module):
    def __init__(self, m, n, has_bias, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(n, m, bias=has_bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def build_peft_linear(W0, b0, r, alpha, rslora=False, init="kaiming", bias="none",
                      dtype=torch.float32, seed=0):
    """``(peft_model, lora_layer)``: PEFT LoRA around ``Linear(W0, b0)`` (dropout 0)."""
    from peft import LoraConfig, get_peft_model

    W0 = _host(W0)
    m, n = W0.shape
    base = _OneLinear(m, n, b0 is not None, dtype)
    with torch.no_grad():
        base.proj.weight.copy_(_tensor(W0, dtype))
        if b0 is not None:
            base.proj.bias.copy_(_tensor(b0, dtype))
    config = LoraConfig(target_modules=["proj"], r=int(r), lora_alpha=alpha,
                        use_rslora=bool(rslora), init_lora_weights=peft_init_name(init),
                        lora_dropout=0.0, bias=bias)
    torch.manual_seed(seed)                    # kaiming/gaussian draws come from torch's RNG
    model = get_peft_model(base, config)
    layer = model.base_model.model.proj        # the peft LoraLayer (tuners.lora.Linear)
    return model, layer


def peft_init(W0, b0, r, alpha, rslora=False, init="kaiming", dtype=torch.float32, seed=0) -> dict:
    """What PEFT's init produces from ``W0``, as host float64 arrays.

    ``weight``: the base weight after init (the residual ``W0 − s·BA`` for pissa/olora),
    ``lora_A (r, n)``, ``lora_B (m, r)``, ``scaling`` (float), ``delta`` = PEFT's own
    ``get_delta_weight`` (``s·BA``, computed in ``dtype``).
    """
    _, layer = build_peft_linear(W0, b0, r, alpha, rslora, init, dtype=dtype, seed=seed)
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
    base = layer.get_base_layer()
    return {
        "weight": _numpy(base.weight),
        "bias": _numpy(base.bias) if base.bias is not None else None,
        "lora_A": _numpy(layer.lora_A["default"].weight),
        "lora_B": _numpy(layer.lora_B["default"].weight),
        "scaling": float(layer.scaling["default"]),
        "delta": _numpy(delta),
    }


def peft_forward_backward(W0, b0, A, B, r, alpha, x, G, rslora=False, bias="none",
                          dtype=torch.float32) -> dict:
    """PEFT forward + autograd backward of ``L = Σ y ⊙ G`` with the given weights.

    The weights (``W0`` base, ``A``, ``B``; e.g. copied from lowrank) replace whatever PEFT
    initialised. Returns host arrays in ``dtype``'s NumPy precision: ``y``, ``dA``, ``dB``,
    ``dx`` and ``db`` (the base bias gradient; None unless ``bias`` trains it), ``delta``
    (PEFT's ``get_delta_weight``, ``s·BA``), plus ``scaling`` and ``frozen_weight_grad``
    (True if PEFT computed a grad for W0 — it must not).
    """
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    model, layer = build_peft_linear(W0, b0, r, alpha, rslora, "kaiming", bias=bias, dtype=dtype)
    base = layer.get_base_layer()
    with torch.no_grad():
        base.weight.copy_(_tensor(W0, dtype))
        layer.lora_A["default"].weight.copy_(_tensor(A, dtype))
        layer.lora_B["default"].weight.copy_(_tensor(B, dtype))
    xt = _tensor(x, dtype).requires_grad_(True)
    y = model(xt)
    (y * _tensor(G, dtype)).sum().backward()
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
    db = base.bias.grad if (base.bias is not None and base.bias.requires_grad) else None
    return {
        "y": _numpy(y, np_dtype),
        "dA": _numpy(layer.lora_A["default"].weight.grad, np_dtype),
        "dB": _numpy(layer.lora_B["default"].weight.grad, np_dtype),
        "dx": _numpy(xt.grad, np_dtype),
        "db": _numpy(db, np_dtype),
        "delta": _numpy(delta, np_dtype),
        "scaling": float(layer.scaling["default"]),
        "frozen_weight_grad": base.weight.grad is not None,
    }
