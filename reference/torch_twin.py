"""A LoRA linear written directly in torch (not PEFT), for autograd gradients in float64.

    y = x W0ᵀ + b0 + s · ((x ⊙ mask) Aᵀ) Bᵀ

W0 (and b0 unless ``train_bias``) are frozen buffers; ``lora_A (r, n)`` and ``lora_B (m, r)``
are Parameters. Arrays come in as host NumPy (or anything ``torch.as_tensor`` takes).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["TorchLoRALinear", "autograd_grads"]


def _tensor(a, dtype):
    if a is None:
        return None
    if hasattr(a, "get") and not isinstance(a, np.ndarray):    # cupy / strict arrays
        a = a.get()
    return torch.as_tensor(np.array(a, dtype=np.float64), dtype=dtype).clone()


class TorchLoRALinear(torch.nn.Module):
    def __init__(self, W0, b0, A, B, scaling, train_bias=False, dtype=torch.float64):
        super().__init__()
        self.register_buffer("weight", _tensor(W0, dtype))             # (m, n), frozen
        b = _tensor(b0, dtype)
        if b is not None and train_bias:
            self.bias = torch.nn.Parameter(b)                          # (m,)
        else:
            self.register_buffer("bias", b)
        self.lora_A = torch.nn.Parameter(_tensor(A, dtype))            # (r, n)
        self.lora_B = torch.nn.Parameter(_tensor(B, dtype))            # (m, r)
        self.scaling = float(scaling)

    def forward(self, x, mask=None):
        base = torch.matmul(x, self.weight.t())
        if self.bias is not None:
            base = base + self.bias
        x_d = x if mask is None else x * mask
        return base + self.scaling * torch.matmul(torch.matmul(x_d, self.lora_A.t()), self.lora_B.t())


def autograd_grads(W0, b0, A, B, scaling, x, G, mask=None, train_bias=False,
                   dtype=torch.float64) -> dict:
    """Forward + autograd backward of ``L = Σ y ⊙ G``; host float64 arrays y, dA, dB, dx, db."""
    layer = TorchLoRALinear(W0, b0, A, B, scaling, train_bias=train_bias, dtype=dtype)
    xt = _tensor(x, dtype).requires_grad_(True)
    mt = _tensor(mask, dtype)
    y = layer(xt, mt)
    (y * _tensor(G, dtype)).sum().backward()

    def out(t):
        return None if t is None else t.detach().cpu().numpy().astype(np.float64)
    db = layer.bias.grad if (train_bias and isinstance(layer.bias, torch.nn.Parameter)) else None
    return {"y": out(y), "dA": out(layer.lora_A.grad), "dB": out(layer.lora_B.grad),
            "dx": out(xt.grad), "db": out(db)}
