"""PEFT round trips (tests/files/test_peft_dirs.py): the torch side, numbers out as NumPy.

``twin_of(config, weights)``: lowrank's GPT as a torch module (the transformers model PEFT
wraps in tests of lowrank's own GPT); ``perturb_peft``: a PEFT model with adapters away from
their init (and AdaLoRA pruned as its allocator would leave it); ``rel``: the figure reported.
"""
from __future__ import annotations

import numpy as np
import torch

from .torch_gpt import TorchGPT

__all__ = ["twin_of", "perturb_peft", "rel"]


def twin_of(config: dict, weights: dict, dtype=torch.float32) -> TorchGPT:
    """``config``: ``GPTConfig.to_dict()``; ``weights``: ``{name: numpy array}``."""
    return TorchGPT.from_config(config, dtype=dtype).load_numpy(weights)


def perturb_peft(model, seed: int, prune: bool = False, scale: float = 0.1) -> None:
    """Move every adapter tensor (and a modules_to_save head) off its init; with ``prune``,
    mask every other AdaLoRA triplet and record PEFT's ``rank_pattern`` for it."""
    gen = torch.Generator().manual_seed(seed)
    pattern = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if prune and "lora_E" in name:
                keep = [i % 2 == 0 for i in range(p.shape[0])]
                p[[not k for k in keep]] = 0.0
                pattern[name.removeprefix("base_model.model.")] = keep
    if prune:
        model.peft_config["default"].rank_pattern = pattern


def rel(a, b) -> float:
    """max |a - b| / max |b| (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
