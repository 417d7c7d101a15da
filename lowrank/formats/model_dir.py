"""One way into a model (docs/pretrained.md#one-way-in): any model directory — lowrank's own
checkpoint or a Hugging Face one — a GGUF file, or a name of an installed model (``minilm``,
``smollm2``). Its ``config.json`` (or GGUF header) is read once, the family decided once
through the models registry, and the weights cast on the host once, on their way to the
backend.

``lr.from_pretrained``, ``lr.load`` and the command line's ``--base`` / ``--model`` all come
through ``open_model``; ``inspect`` tells what a directory holds without building anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import backend as _backend
from .. import models
from ..files.gguf_file import open_gguf
from ..files.locate import CONFIG_FILE, gguf_file, resolve
from ..files.storage import read_json
from . import checkpoint, gguf_model, hf_model

LOWRANK, HUGGING_FACE, GGUF = "lowrank", "huggingface", "gguf"


@dataclass(frozen=True)
class ModelSource:
    """What a model directory or file holds: ``kind`` (lowrank, huggingface or gguf), its
    config as read (checked: sealed and schema-valid for lowrank's; a GGUF header as a Hugging
    Face config), the registered family, and the opened GGUF file (``gguf`` only)."""
    path: Path
    kind: str
    config: dict
    model_type: str
    handle: object = None


def inspect(path) -> ModelSource:
    """Read ``path``'s ``config.json`` (or GGUF header) once and say whose model it is."""
    file = gguf_file(path)
    if file is not None:   # a .gguf path, or "smollm2" (docs/gguf.md#files)
        handle = open_gguf(file)
        return ModelSource(file, GGUF, handle.config, models.entry(handle.config["model_type"]).name,
                           handle)
    directory = resolve(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_FILE}")
    raw = read_json(config_path)
    if "format" in raw:
        config = checkpoint.check_config(raw, config_path)
        saved = config.get("model")
        if not isinstance(saved, dict):
            raise ValueError(f"{config_path} has no 'model' entry (a training-state-only "
                             "directory?)")
        model_type = saved.get("model_type")
        if model_type not in models.names():
            raise ValueError(f"{config_path}: model field 'model_type' is {model_type!r}; "
                             f"registered: {models.names()}")
        return ModelSource(directory, LOWRANK, config, model_type)
    if "model_type" not in raw:
        raise ValueError(f"{config_path} has no 'model_type' (nor a lowrank 'format')")
    entry = models.entry(raw["model_type"])
    if entry.key_map is None:
        raise ValueError(f"{config_path}: model_type {entry.name!r} is lowrank's own; a "
                         "Hugging Face directory cannot hold it")
    return ModelSource(directory, HUGGING_FACE, raw, entry.name)


def open_model(path, dtype: str | None = None, backend: str | None = None):
    """The model in ``path`` (a directory, a name, or an ``inspect`` result) on ``backend``
    (default: the active one), in ``dtype`` (default: a lowrank checkpoint's saved dtype,
    float32 for a Hugging Face directory)."""
    source = path if isinstance(path, ModelSource) else inspect(path)
    dtype = None if dtype is None else _backend.check_dtype(dtype)
    if source.kind == LOWRANK:
        model = checkpoint.load_model(source.path, backend, dtype=dtype, config=source.config)
    elif source.kind == GGUF:
        return gguf_model.from_gguf(source.path, dtype or _backend.DEFAULT_DTYPE, backend,
                                    gguf=source.handle)
    else:
        model = hf_model.load_hf(source.path, source.config, dtype or _backend.DEFAULT_DTYPE,
                                 backend)
    # where the weights came from: PEFT-format adapter files name the transformers modules
    # and re-express PiSSA over these weights (docs/peft.md#names)
    model.pretrained_from = {"path": str(source.path), "model_type":
                             source.model_type if source.kind == HUGGING_FACE else LOWRANK}
    return model


def from_pretrained(path, dtype: str = "float32", backend: str | None = None):
    """``lr.from_pretrained``: the model in ``path`` in ``dtype`` (float32 unless asked)."""
    return open_model(path, dtype, backend)


__all__ = ["ModelSource", "inspect", "open_model", "from_pretrained", "LOWRANK", "HUGGING_FACE",
           "GGUF"]
