"""``quantize_base(model, "keep")``: a model read from a GGUF file gets its quantized weights
back in the file's own blocks (docs/gguf.md#kept-quantized).

The model (the Llama family: its parameter names are the Hugging Face names the GGUF reader
gives) was loaded dequantised; every ``Linear``, adapter base and embedding whose tensor the
file stores as one of ``KEPT_TYPES`` swaps its float weight for a ``GGUFBlocksParameter`` of
those blocks. A weight that no longer equals its dequantised blocks (an adapter init that
rewrote its base, a merged adapter) stays in float and is counted under ``"kept_float"``.
"""
from __future__ import annotations

from .. import backend
from ..adapters import AdaptedLinear
from ..files.gguf_file import open_gguf
from ..models.blocks import Embedding
from ..nn.layers import Linear
from .gguf_blocks import KEPT_TYPES, GGUFBlocksParameter


def gguf_source(model) -> str:
    source = getattr(model, "pretrained_from", None) or {}
    if source.get("format") != "gguf":
        raise ValueError("quantize_base(kind='keep') needs a model read from a GGUF file "
                         "(lr.from_pretrained of a .gguf file); this one was not")
    return source["path"]


def keep_gguf_base(model) -> dict:
    """Swap the float weights of ``model`` for the GGUF file's blocks, in place. Returns
    ``{"modules", "weights", "bytes", "bits_per_weight", "types", "kept_float",
    "float32_bytes"}`` over the weights kept quantized."""
    gguf = open_gguf(gguf_source(model))
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, (Linear, AdaptedLinear, Embedding)):
            owners[f"{name}.weight" if name else "weight"] = module
    wanted = {n for n in owners if not isinstance(owners[n].weight, GGUFBlocksParameter)}
    report = {"modules": 0, "weights": 0, "bytes": 0, "types": {}, "kept_float": []}
    for name, qtype, raw, shape in gguf.iter_raw(wanted):
        module = owners[name]
        if qtype not in KEPT_TYPES or len(shape) != 2:
            continue
        current = module.weight
        xp = backend.get_namespace(current.data)
        kept = GGUFBlocksParameter(raw, qtype, shape, dtype=str(current.dtype), xp=xp,
                                   source=name)
        if getattr(module, "merged", False) or tuple(current.shape) != tuple(shape) or \
                not bool((kept.data == current.data).all()):
            report["kept_float"].append(name)   # the weight is no longer the file's
            continue
        module.weight = kept
        report["modules"] += 1
        report["weights"] += shape[0] * shape[1]
        report["bytes"] += kept.nbytes()
        report["types"][qtype] = report["types"].get(qtype, 0) + 1
    if not report["modules"]:
        raise ValueError("quantize_base(kind='keep'): no weight of the model is stored "
                         f"quantized in its GGUF file (kept types: {', '.join(KEPT_TYPES)})")
    report["bits_per_weight"] = 8.0 * report["bytes"] / report["weights"]
    report["float32_bytes"] = 4 * report["weights"]
    return report


def base_bytes(model) -> dict:
    """Bytes the frozen base holds: ``{"kept", "float"}`` over the model's non-trainable
    parameters (a kept weight counts its blocks; a tied head is counted once)."""
    seen, kept, plain = set(), 0, 0
    for _, p in model.named_parameters():
        if id(p) in seen or p.trainable:
            continue
        seen.add(id(p))
        if isinstance(p, GGUFBlocksParameter) and p.is_quantized:
            kept += p.nbytes()
        else:
            plain += int(p.data.nbytes)
    return {"kept": kept, "float": plain}


__all__ = ["keep_gguf_base", "base_bytes", "gguf_source"]
