"""Hugging Face model directories -> lowrank models with the checkpoint's numbers
(docs/pretrained.md#from-pretrained): tensors are read into host arrays, mapped through the
family's key map (transposed / split) and cast on the host, then moved with
``backend.asarray``. ``model_dir.open_model`` is the way in.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import backend as _backend
from .. import models
from ..files.locate import CONFIG_FILE
from ..files.storage import read_json, read_safetensors
from .hf_config_check import check_config_against_headers

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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


def load_hf(directory: Path, hf_config: dict, dtype: str, backend: str | None = None):
    """The lowrank model of the Hugging Face directory ``directory`` whose ``config.json``
    holds ``hf_config`` (read by ``model_dir.inspect``), its weights cast to ``dtype`` on the
    host and moved to ``backend``."""
    xp = None if backend is None else _backend.namespace(backend)
    entry = models.entry(hf_config["model_type"])
    check_config_against_headers(directory, hf_config, entry, directory / CONFIG_FILE)
    tensors, where = _strip(*read_tensors(directory), entry)
    config_path = directory / CONFIG_FILE
    config = entry.config_from_hf(hf_config, set(tensors), str(config_path))
    _check_fits_tensors(config, tensors, config_path)
    model = models.build(config, dtype=dtype, xp=xp)
    assign(model, map_tensors(model, tensors, where, entry, directory), dtype)
    return model


__all__ = ["load_hf", "read_tensors", "map_tensors"]
