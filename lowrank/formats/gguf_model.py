"""``lr.from_pretrained`` of a GGUF file: the Llama-family model it holds, dequantised to the
asked dtype on load (docs/gguf.md#files).

Names and shapes are checked against the model before any tensor is dequantised; then the
tensors are dequantised one at a time straight into the model's parameters, so the peak is the
model plus one tensor.
"""
from __future__ import annotations

import numpy as np

from .. import backend as _backend
from .. import models
from ..files.gguf_file import open_gguf


def from_gguf(path, dtype: str = "float32", backend: str | None = None):
    """The model in the GGUF file ``path`` (architectures ``llama``, ``qwen2``)."""
    dtype = _backend.check_dtype(dtype)
    xp = None if backend is None else _backend.namespace(backend)
    gguf = open_gguf(path)
    entry = models.entry(gguf.config["model_type"])
    shapes = gguf.shapes()
    config = entry.config_from_hf(gguf.config, set(shapes), str(path))
    model = models.build(config, dtype=dtype, xp=xp)
    params = dict(model.named_parameters())
    wanted = {}   # foreign (Hugging Face) name -> (lowrank name, transform)
    for name, (foreign, transform) in entry.key_map(model).items():
        if foreign not in shapes:
            raise ValueError(f"{path}: no tensor for {foreign!r} (the {entry.name} model's "
                             f"parameter {name!r} needs it)")
        if transform is None and tuple(shapes[foreign]) != tuple(params[name].shape):
            raise ValueError(f"{path}: tensor for {foreign!r} has shape {shapes[foreign]}, the "
                             f"model needs {tuple(params[name].shape)}")
        wanted[foreign] = (name, transform)
    for foreign, array in gguf.iter_tensors():
        if foreign not in wanted:   # a tied head written anyway: unused
            continue
        name, transform = wanted[foreign]
        array = array if transform is None else transform(array)
        p = params[name]
        if tuple(array.shape) != tuple(p.shape):
            raise ValueError(f"{path}: tensor for {foreign!r} gives shape {array.shape}, the "
                             f"model needs {tuple(p.shape)}")
        p.data = _backend.asarray(np.ascontiguousarray(array, dtype=dtype),
                                  xp=_backend.get_namespace(p.data))
    model.pretrained_from = {"path": str(path), "model_type": entry.name, "format": "gguf"}
    return model


__all__ = ["from_gguf"]
