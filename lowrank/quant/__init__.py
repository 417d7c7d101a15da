"""Quantized storage for frozen base weights (QLoRA's NF4) — docs/variants.md#nf4.

``quantize_base(model, "nf4")`` stores every frozen linear weight of ``model`` (plain
``Linear`` layers and the base of every adapter) as NF4; adapters keep training in full
precision on top, any variant. Call it after ``inject``: an adapter copies its base when it
is built (and PiSSA-like inits rewrite it), so the quantized base is the one it trains on.

``quantize_base(model, "keep")`` does not quantize: a model read from a GGUF file gets its
weights back in the file's own blocks (Q8_0, Q4_0, Q4_1, F16), dequantised tile by tile per
use (docs/gguf.md#kept-quantized).
"""
from __future__ import annotations

from ..adapters import AdaptedLinear
from ..nn.layers import Linear
from .gguf_base import base_bytes, keep_gguf_base
from .gguf_blocks import KEPT_TYPES, GGUFBlocksParameter
from .nf4 import (BLOCK, NF4_CODE, NF4Parameter, NF4Tensor, dequantize_nf4, dynamic_map_8bit,
                  quantize_nf4)

QUANTIZE_KINDS = ("nf4", "keep")


def quantize_base(model, kind: str = "nf4", double_quant: bool = False,
                  prefix: str = "") -> dict:
    """Quantize the weights of ``model``'s linear layers in place; they are frozen from then
    on (an NF4 weight never trains: QLoRA). ``prefix`` limits it to the modules whose name
    starts with it (``"encoder."``). Returns
    ``{"modules", "weights", "bytes", "bits_per_weight"}`` over what was quantized."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"kind must be one of {QUANTIZE_KINDS}, got {kind!r}")
    if kind == "keep":
        if prefix or double_quant:
            raise ValueError("quantize_base(kind='keep') takes no prefix nor double_quant")
        return keep_gguf_base(model)
    modules = weights = nbytes = 0
    for name, module in model.named_modules():
        if not isinstance(module, (Linear, AdaptedLinear)) or not name.startswith(prefix):
            continue
        weight = module.weight
        if isinstance(weight, (NF4Parameter, GGUFBlocksParameter)):
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


__all__ = ["GGUFBlocksParameter", "KEPT_TYPES", "base_bytes", "keep_gguf_base", "BLOCK", "NF4_CODE", "NF4Parameter", "NF4Tensor", "QUANTIZE_KINDS",
           "dequantize_nf4", "dynamic_map_8bit", "quantize_base", "quantize_nf4"]
