"""Quantized storage for frozen base weights (QLoRA's NF4) — docs/variants.md#nf4.

``quantize_base(model, "nf4")`` stores every frozen linear weight of ``model`` (plain
``Linear`` layers and the base of every adapter) as NF4; adapters keep training in full
precision on top, any variant. Call it after ``inject``: an adapter copies its base when it
is built (and PiSSA-like inits rewrite it), so the quantized base is the one it trains on.
"""
from __future__ import annotations

from ..adapters import AdaptedLinear
from ..nn.layers import Linear
from .nf4 import (BLOCK, NF4_CODE, NF4Parameter, NF4Tensor, dequantize_nf4, dynamic_map_8bit,
                  quantize_nf4)

QUANTIZE_KINDS = ("nf4",)


def quantize_base(model, kind: str = "nf4", double_quant: bool = False,
                  prefix: str = "") -> dict:
    """Quantize the weights of ``model``'s linear layers in place; they are frozen from then
    on (an NF4 weight never trains: QLoRA). ``prefix`` limits it to the modules whose name
    starts with it (``"encoder."``). Returns
    ``{"modules", "weights", "bytes", "bits_per_weight"}`` over what was quantized."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"kind must be one of {QUANTIZE_KINDS}, got {kind!r}")
    modules = weights = nbytes = 0
    for name, module in model.named_modules():
        if not isinstance(module, (Linear, AdaptedLinear)) or not name.startswith(prefix):
            continue
        weight = module.weight
        if isinstance(weight, NF4Parameter):
            continue   # quantized already
        if isinstance(module, AdaptedLinear) and module.merged:
            raise ValueError("quantize_base: unmerge the adapters first (a merged weight "
                             "holds the adapter)")
        module.weight = NF4Parameter(weight.data, double_quant)
        modules += 1
        weights += module.weight.quantized.numel
        nbytes += module.weight.nbytes()
    if not modules:
        raise ValueError("quantize_base: the model has no linear weight left to quantize")
    return {"modules": modules, "weights": weights, "bytes": nbytes,
            "bits_per_weight": 8.0 * nbytes / weights}


__all__ = ["BLOCK", "NF4_CODE", "NF4Parameter", "NF4Tensor", "QUANTIZE_KINDS",
           "dequantize_nf4", "dynamic_map_8bit", "quantize_base", "quantize_nf4"]
