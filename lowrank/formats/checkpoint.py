"""Checkpoints: safetensors weights plus JSON metadata, every file written atomically.

Host-side I/O (docs/conventions.md#host-io): arrays leave the device with
``backend.to_numpy`` and come back with ``backend.asarray``; numpy is used here for host
arrays only. What model and adapter files share lives in ``lowrank.files.storage``.

A model directory holds

* ``model.safetensors`` — every ``named_parameters()`` entry, keyed by its name
  (docs/models.md#parameter-names, torch layout), so the file loads into PyTorch as it is;
* ``config.json`` — ``{"format", "lowrank_version", "model": config.to_dict(), "dtype",
  "train_state"}``; ``train_state`` is JSON with every array replaced by a reference
  ``{"__tensor__": key}`` into
* ``optimizer.safetensors`` — the array-valued training state (AdamW moments, keys
  ``exp_avg.<param name>``, ``exp_avg_sq.<param name>``), stored bit for bit.

An adapter directory holds ``adapter_model.safetensors`` (PEFT keys, e.g.
``blocks.0.attn.q.lora_A.weight``) and ``adapter_config.json`` (``lowrank.formats.adapter_dir``).

Atomicity (``lowrank.files.storage.StagedFiles``): a save writes its data files under versioned
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

from .. import backend as _backend  # load_model's argument is called backend
from .. import models
from .adapter_dir import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, load_adapter,  # noqa: F401
                          read_adapter_config, save_adapter)
from ..files.json_arrays import join_arrays
from ..files.locate import CONFIG_FILE
from ..nn.module import Module
from ..files.schema import MODEL_CONFIG_SCHEMA, MODEL_SIZE, TRAIN_STATE, check
from ..files.storage import (OPTIMIZER_FILE, StagedFiles, atomic_write, check_and_assign, cap_for,
                             read_json, read_safetensors, read_saved_tensors, read_sealed_json,
                             resolve_weights_file, stage, stage_state)
from ..files.untrusted import regular_file, verify_seal
from .._version import __version__

MODEL_FILE = "model.safetensors"
FORMAT = "lowrank"


# --- models ----------------------------------------------------------------------------------

def _model_config_dict(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no .config to save")
    if hasattr(cfg, "to_dict"):
        data = cfg.to_dict()
    elif dataclasses.is_dataclass(cfg):
        data = dataclasses.asdict(cfg)
    else:
        raise ValueError(f"model.config ({type(cfg).__name__}) has no to_dict()")
    model_type = models.type_of(cfg)   # None: a module of the caller's own, not rebuildable
    return data if model_type is None else {"model_type": model_type, **data}


def _model_dtype(model) -> str | None:
    for _, p in model.named_parameters():
        return np.dtype(p.dtype).name
    return None


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
        stage(staged, directory / MODEL_FILE, tensors, "model", files)
        stale = stage_state(staged, directory, config, train_state, files)
        staged.commit(directory / CONFIG_FILE, config, remove=stale)
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
    config = read_config(directory) if config_path.exists() else {"format": FORMAT}
    files = dict(config.get("files") or {})
    with StagedFiles() as staged:
        stale = stage_state(staged, directory, config,
                            _training_state(step, optimizer_state, rng_state, extra), files)
        staged.commit(directory / CONFIG_FILE, config, remove=stale)
    return directory


def _training_state(step, optimizer_state, rng_state, extra) -> dict:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"step must be an integer, got {step!r}")
    return {"step": int(step), "optimizer": optimizer_state, "rng": rng_state,
            "extra": {} if extra is None else extra}


def _state_json(directory: Path) -> dict:
    """The JSON holding a directory's training state: an adapter directory keeps it in
    ``adapter_config.json`` (one commit point for adapter and state), a model in config.json."""
    adapter = directory / ADAPTER_CONFIG_FILE
    if adapter.exists():
        info = read_adapter_config(directory)
        if info.get("train_state") is not None or not (directory / CONFIG_FILE).exists():
            return info, adapter
    return read_config(directory), directory / CONFIG_FILE


def load_training_state(directory, expected_shapes: dict | None = None,
                        max_bytes: int | None = None) -> dict | None:
    """The ``train_state`` saved in ``directory`` with its arrays restored (host numpy), or
    ``None`` if none was saved. After ``save_training_state`` the dict has ``step``,
    ``optimizer``, ``rng`` and ``extra``. ``expected_shapes`` (file key -> shape, e.g.
    ``exp_avg.<param name>``) are checked before the arrays are read; ``max_bytes`` caps the
    size of ``optimizer.safetensors``."""
    directory = Path(directory)
    config, source = _state_json(directory)
    skeleton = config.get("train_state")
    if skeleton is None:
        return None
    check(skeleton, TRAIN_STATE, f"{source}: train_state")
    tensors = {}
    if OPTIMIZER_FILE in (config.get("files") or {}):
        source, tensors = read_saved_tensors(directory, config, OPTIMIZER_FILE, source,
                                             expected_shapes, max_bytes)
    return join_arrays(skeleton, tensors, source)   # references carry the exact keys


def load_weights(model: Module, directory_or_file, strict: bool = True,
                 config: dict | None = None):
    """Load ``model.safetensors`` (or the given file) into ``model`` by parameter name.

    Arrays are cast to each parameter's dtype and moved to its backend. Missing keys,
    unexpected keys (both only with ``strict``) and shape mismatches raise ValueError naming
    the key and shapes; nothing is assigned then. Returns ``(missing, unexpected)`` keys.
    ``config``: the directory's checked ``config.json`` when the caller has it already.
    """
    path = Path(directory_or_file)
    expected = dict(model.named_parameters())
    shapes = {k: p.shape for k, p in expected.items()}
    if path.is_dir() and (path / CONFIG_FILE).exists():
        config = read_config(path) if config is None else config
        path, tensors = read_saved_tensors(path, config, MODEL_FILE,
                                           path / CONFIG_FILE, shapes,
                                           cap_for(expected.values()))
    else:   # a bare weights file (another tool's): no save record to check it against
        path = resolve_weights_file(path, MODEL_FILE)
        tensors = read_safetensors(path, expected_shapes=shapes)
    return check_and_assign(expected, tensors, path, strict)


def check_config(raw: dict, path) -> dict:
    """A lowrank model ``config.json`` already read from ``path``: its integrity record and
    schema checked."""
    return check(verify_seal(raw, path, __version__), MODEL_CONFIG_SCHEMA, str(path))


def read_config(directory) -> dict:
    """The ``config.json`` of a saved model, its integrity record and schema checked."""
    path = Path(directory) / CONFIG_FILE
    return check_config(read_json(path), path)


def load_model(directory, backend: str | None = None, dtype: str | None = None,
               config: dict | None = None):
    """Rebuild the model saved in ``directory`` (its family from the models registry) and load
    its weights, cast on the host to ``dtype`` (default: the saved dtype).

    ``backend`` ('numpy', 'numpy-strict', 'cupy'; default: the active one) says where the
    parameters live; ``config`` is the directory's ``config.json`` when the caller has read
    and checked it already (``model_dir.inspect``).
    """
    directory = Path(directory)
    config = read_config(directory) if config is None else config
    where = str(directory / CONFIG_FILE)
    if "model" not in config:
        raise ValueError(f"{where} has no 'model' entry (a training-state-only directory?)")
    saved_dtype = config.get("dtype") or _backend.DEFAULT_DTYPE
    if saved_dtype not in ("float32", "float64"):
        raise ValueError(f"{where}: field 'dtype' must be float32 or float64, got "
                         f"{saved_dtype!r}")
    dtype = dtype or saved_dtype
    check(config["model"], {str: MODEL_SIZE}, f"{where}: model")
    try:
        model_config = models.config_from_dict(config["model"], where)
    except ValueError as exc:   # the config class's own check names the field, not the file
        raise (exc if where in str(exc) else ValueError(f"{where}: model: {exc}")) from None
    _check_fits_file(model_config, saved_dtype, directory)
    xp = None if backend is None else _backend.namespace(backend)
    model = models.build(model_config, dtype=dtype, xp=xp)
    load_weights(model, directory, strict=True, config=config)
    return model


def _check_fits_file(cfg, dtype: str, directory: Path) -> None:
    """Refuse sizes the weights file cannot hold before a byte is allocated: every parameter
    is in ``model.safetensors``, so a floor on the parameters' bytes (embeddings and the
    attention projections of every layer, whatever the family calls its sizes) never
    exceeds the file's size."""
    def field(*names):
        return next((int(getattr(cfg, n)) for n in names if isinstance(getattr(cfg, n, None),
                                                                        int)), 0)
    d = field("d_model", "hidden_size")
    rows = field("vocab_size") + field("context", "max_position_embeddings")
    count = (cfg.parameter_floor() if hasattr(cfg, "parameter_floor")   # the config knows
             else rows * d + field("n_layer", "num_hidden_layers") * 4 * d * d)
    floor = count * np.dtype(dtype).itemsize
    size = regular_file(directory / MODEL_FILE, 1 << 62, "safetensors file")
    if floor > size:
        raise ValueError(f"{directory / CONFIG_FILE}: the model config needs at least "
                         f"{floor:,} bytes of parameters, {directory / MODEL_FILE} has "
                         f"{size:,} bytes")


__all__ = [
    "MODEL_FILE", "CONFIG_FILE", "OPTIMIZER_FILE", "ADAPTER_FILE", "ADAPTER_CONFIG_FILE",
    "atomic_write", "save_model", "load_weights", "load_model", "read_config",
    "save_training_state", "load_training_state", "save_adapter", "load_adapter",
    "read_adapter_config",
]
