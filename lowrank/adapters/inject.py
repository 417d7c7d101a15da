"""Put adapters into a model: ``inject(model, cfg, targets=["q", "v"])`` (PEFT's target_modules).

``targets`` is a list of name suffixes (``"q"`` matches ``blocks.0.attn.q``; ``"attn.q"`` works
too) or a single regex string that must match the whole module name, as in PEFT. Every matching
``Linear`` is replaced by an ``AdaptedLinear`` over its weight; the rest of the model is frozen,
so only adapter parameters (and biases, with ``bias="all"``) train.
"""
from __future__ import annotations

import re

from ..layers import Linear
from .base import AdaptedLinear, AdapterConfig

SEED_STRIDE = 7919   # layer i of an injection gets seed + SEED_STRIDE·i (reproducible per layer)


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(model, targets, who: str = "") -> list:
    """``[(name, Linear)]`` of ``model`` matching ``targets``; a target that matches nothing
    raises ValueError listing the Linear modules that exist (``who`` prefixes the message)."""
    if not targets:
        raise ValueError(f"{who}targets must name at least one module")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    chosen = [(name, m) for name, m in linears if _matches(name, targets)]
    unmatched = [] if isinstance(targets, str) else \
        [t for t in targets if not any(_matches(name, [t]) for name, _ in linears)]
    if not chosen or unmatched:
        raise ValueError(f"{who}targets {unmatched or targets!r} match no Linear module; "
                         f"Linear modules: {[name for name, _ in linears]}")
    return chosen


def _set_child(model, name: str, child) -> None:
    *path, last = name.split(".")
    parent = model
    for part in path:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    if last.isdigit():
        parent[int(last)] = child
    else:
        setattr(parent, last, child)


def inject(model, cfg: AdapterConfig, targets, seed: int = 0) -> list[str]:
    """Wrap the matching Linears of ``model`` in adapters; returns the adapted module names."""
    if not isinstance(cfg, AdapterConfig):
        raise ValueError(f"cfg must be an adapter config, got {type(cfg).__name__}")
    chosen = select_targets(model, targets)
    model.freeze()
    names = []
    for i, (name, linear) in enumerate(chosen):
        bias = None if linear.bias is None else linear.bias.data
        _set_child(model, name, AdaptedLinear(linear.weight.data, bias, cfg,
                                              seed=seed + SEED_STRIDE * i))
        names.append(name)
    layers = [m for name, m in adapted_modules(model) if name in names]
    type(layers[0]).after_inject(model, layers)   # what the layers share (VeRA's projections)
    if cfg.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.trainable = True
    return names


def adapted_modules(model) -> list[tuple[str, AdaptedLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def merge_all(model) -> None:
    for _, module in adapted_modules(model):
        module.merge()
