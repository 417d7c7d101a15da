"""Checkpoints: safetensors weights plus JSON metadata, every file written atomically.

Host-side I/O (SPEC §0): arrays leave the device with ``backend.to_numpy`` and come back with
``backend.asarray``; numpy is used here for host arrays only.

A model directory holds

* ``model.safetensors`` — every ``named_parameters()`` entry, keyed by its name (SPEC §3
  names, torch layout), so the file loads into PyTorch as it is;
* ``config.json`` — ``{"format", "lowrank_version", "model": config.to_dict(), "dtype",
  "train_state"}``; ``train_state`` is JSON with every array replaced by a reference
  ``{"__tensor__": key}`` into
* ``optimizer.safetensors`` — the array-valued training state (AdamW moments, keys
  ``exp_avg.<param name>``, ``exp_avg_sq.<param name>``), stored bit for bit.

An adapter directory holds ``adapter_model.safetensors`` (PEFT keys, e.g.
``blocks.0.attn.q.lora_A.weight``) and ``adapter_config.json``.

Atomicity (``lowrank.storage.StagedFiles``): a save writes its data files under versioned
names, then replaces the JSON that records their save ids — the one commit point — then moves
them onto their canonical names; loading follows the JSON, so a process killed at any moment
leaves one whole save. An adapter directory keeps its training state in adapter_config.json
for the same reason. Each safetensors file also carries a SHA-256 of its tensors, so bit rot
or a torn copy is reported instead of loaded.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import backend
from . import backend as _backend
from . import models
from .module import Module
from .storage import (SAVE_ID_KEY, StagedFiles, atomic_write, encode_train_state,  # noqa: F401
                      join_arrays, json_bytes, read_json, read_safetensors, resolve_saved,
                      safetensors_bytes)

_read_safetensors = read_safetensors   # older name, used by tests and tools

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FORMAT = "lowrank"
ADAPTER_FORMAT = "lowrank-adapter"

# lowrank parameter name -> PEFT key suffix (other adapter parameters keep their names)
_PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


# --- models ----------------------------------------------------------------------------------

def _model_config_dict(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no .config to save")
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, dict):
        return dict(cfg)
    raise ValueError(f"model.config ({type(cfg).__name__}) has no to_dict()")


def _model_dtype(model) -> str | None:
    for _, p in model.named_parameters():
        return np.dtype(p.dtype).name
    return None


def _stage(staged: StagedFiles, path: Path, tensors: dict, kind: str, files: dict) -> None:
    """Add a safetensors file stamped with the save's id; record the id for the JSON."""
    staged.add(path, safetensors_bytes(tensors, {"kind": kind, SAVE_ID_KEY: staged.save_id}))
    files[path.name] = staged.save_id


def _stage_state(staged, directory: Path, config: dict, train_state, files: dict) -> list:
    """Stage the training state's arrays (``optimizer.safetensors``) and record the state in
    ``config`` (the JSON the caller commits); returns files the new save no longer needs."""
    skeleton, tensors = (None, {}) if train_state is None else encode_train_state(train_state)
    stale = []
    if tensors:
        _stage(staged, directory / OPTIMIZER_FILE, tensors, "train_state", files)
    elif files.pop(OPTIMIZER_FILE, None) is not None or (directory / OPTIMIZER_FILE).exists():
        stale.append(directory / OPTIMIZER_FILE)
    config.update(lowrank_version=_version(), train_state=skeleton, files=files)
    return stale


def save_model(model: Module, directory, train_state: dict | None = None) -> Path:
    """Save ``model`` (and optionally the training state) into ``directory``: one staged set of
    ``model.safetensors`` (keys = parameter names), ``optimizer.safetensors``, ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "model": _model_config_dict(model), "dtype": _model_dtype(model)}
    tensors = {}
    for name, p in model.named_parameters():
        if name in tensors:
            raise ValueError(f"parameter name {name!r} occurs twice in the model")
        tensors[name] = p.data
    files: dict = {}
    with StagedFiles() as staged:
        _stage(staged, directory / MODEL_FILE, tensors, "model", files)
        stale = _stage_state(staged, directory, config, train_state, files)
        staged.commit(directory / CONFIG_FILE, json_bytes(config), remove=stale)
    return directory


def save_training_state(directory, step: int, optimizer_state: dict, rng_state: dict,
                        extra: dict | None = None) -> Path:
    """Save what ``--resume`` needs to continue bit-identically.

    ``optimizer_state`` is the optimizer's ``state_dict()``-like dict: arrays (any backend)
    go to ``optimizer.safetensors`` bit for bit (``{"exp_avg": {name: a}}`` -> key
    ``exp_avg.<name>``); scalars (step counts, hyper-parameters) stay in JSON.
    ``rng_state`` is e.g. ``numpy.random.Generator.bit_generator.state`` (JSON-able).
    The state is stored as ``config.json["train_state"]``; an existing ``config.json`` (from
    ``save_model``) keeps its other fields.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / CONFIG_FILE
    config = read_json(config_path) if config_path.exists() else {"format": FORMAT}
    files = dict(config.get("files") or {})
    with StagedFiles() as staged:
        stale = _stage_state(staged, directory, config,
                             _training_state(step, optimizer_state, rng_state, extra), files)
        staged.commit(directory / CONFIG_FILE, json_bytes(config), remove=stale)
    return directory


def _training_state(step, optimizer_state, rng_state, extra) -> dict:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"step must be an integer, got {step!r}")
    return {"step": int(step), "optimizer": optimizer_state, "rng": rng_state,
            "extra": {} if extra is None else extra}


def saved_file(directory, config: dict, name: str) -> Path:
    """The file ``name`` of the save ``config`` (a committed JSON) records: its own version,
    whatever a later save cut short left under the canonical name."""
    return resolve_saved(directory, name, (config.get("files") or {}).get(name))


def _state_json(directory: Path) -> dict:
    """The JSON holding a directory's training state: an adapter directory keeps it in
    ``adapter_config.json`` (one commit point for adapter and state), a model in config.json."""
    adapter = directory / ADAPTER_CONFIG_FILE
    if adapter.is_file():
        info = read_json(adapter)
        if info.get("train_state") is not None or not (directory / CONFIG_FILE).is_file():
            return info
    return read_json(directory / CONFIG_FILE)


def load_training_state(directory) -> dict | None:
    """The ``train_state`` saved in ``directory`` with its arrays restored (host numpy), or
    ``None`` if none was saved. After ``save_training_state`` the dict has ``step``,
    ``optimizer``, ``rng`` and ``extra``."""
    directory = Path(directory)
    config = _state_json(directory)
    skeleton = config.get("train_state")
    if skeleton is None:
        return None
    source = saved_file(directory, config, OPTIMIZER_FILE)
    tensors = read_safetensors(source) if source.exists() else {}
    return join_arrays(skeleton, tensors, source)   # references carry the exact keys


def _resolve_weights_file(directory_or_file, default_name: str) -> Path:
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def _check_and_assign(expected: dict, tensors: dict, source, strict: bool) -> tuple[list, list]:
    """Check ``tensors`` (file key -> host array) against ``expected`` (file key -> Parameter)
    and assign all of them, or none when something is wrong."""
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    if strict and missing:
        k = missing[0]
        raise ValueError(f"missing key {k!r} in {source}: the model's parameter has shape "
                         f"{tuple(expected[k].shape)}, the file has no such tensor "
                         f"({len(missing)} missing in all: {missing[:5]})")
    if strict and unexpected:
        k = unexpected[0]
        raise ValueError(f"unexpected key {k!r} in {source} with shape "
                         f"{tuple(tensors[k].shape)}: the model has no such parameter "
                         f"({len(unexpected)} unexpected in all: {unexpected[:5]})")
    for k, p in expected.items():
        if k in tensors and tuple(tensors[k].shape) != tuple(p.shape):
            raise ValueError(f"shape mismatch for key {k!r} in {source}: file has "
                             f"{tuple(tensors[k].shape)}, model has {tuple(p.shape)}")
    new = {}
    for k, p in expected.items():
        if k in tensors:
            xp = backend.get_namespace(p.data)
            new[k] = backend.asarray(tensors[k], dtype=p.data.dtype, xp=xp)
    for k, arr in new.items():
        expected[k].data = arr
    return missing, unexpected


def load_weights(model: Module, directory_or_file, strict: bool = True):
    """Load ``model.safetensors`` (or the given file) into ``model`` by parameter name.

    Arrays are cast to each parameter's dtype and moved to its backend. Missing keys,
    unexpected keys (both only with ``strict``) and shape mismatches raise ValueError naming
    the key and shapes; nothing is assigned then. Returns ``(missing, unexpected)`` keys.
    """
    path = Path(directory_or_file)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        path = saved_file(path, read_json(path / CONFIG_FILE), MODEL_FILE)
    path = _resolve_weights_file(path, MODEL_FILE)
    tensors = read_safetensors(path)
    expected = dict(model.named_parameters())
    return _check_and_assign(expected, tensors, path, strict)


def read_config(directory) -> dict:
    """The ``config.json`` of a saved model."""
    return read_json(Path(directory) / CONFIG_FILE)


def load_model(directory, backend: str | None = None):
    """Rebuild the model saved in ``directory`` (its family from the models registry, a GPT
    when the config names none) and load its weights.

    ``backend`` ('numpy', 'numpy-strict', 'cupy'; default: the active one) says where the
    parameters live.
    """
    name = backend
    directory = Path(directory)
    config = read_json(directory / CONFIG_FILE)
    if "model" not in config:
        hint = ("a Hugging Face model directory: load it with lr.from_pretrained"
                if "model_type" in config else "a training-state-only directory?")
        raise ValueError(f"{directory / CONFIG_FILE} has no 'model' entry ({hint})")
    dtype = config.get("dtype") or _backend.DEFAULT_DTYPE
    model_config = models.config_from_dict(config["model"], str(directory / CONFIG_FILE))
    xp = None if name is None else _backend.namespace(name)
    model = models.build(model_config, dtype=dtype, xp=xp)
    load_weights(model, directory, strict=True)
    return model


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:   # pragma: no cover
        return "unknown"


from .adapter_files import load_adapter, read_adapter_config, save_adapter  # noqa: E402

__all__ = [
    "MODEL_FILE", "CONFIG_FILE", "OPTIMIZER_FILE", "ADAPTER_FILE", "ADAPTER_CONFIG_FILE",
    "atomic_write", "save_model", "load_weights", "load_model", "read_config",
    "save_training_state", "load_training_state", "save_adapter", "load_adapter",
    "read_adapter_config",
]
