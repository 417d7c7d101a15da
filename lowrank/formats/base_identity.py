"""Which base an adapter was trained on (docs/training.md#checkpoints): ``run.json`` records
the SHA-256 of the base's weights, and applying the adapter (``eval``, ``generate``) or
resuming its run checks it.

An adapter is a small correction to one particular set of weights: applied to another base
(``pretrain --out base --force`` rebuilt it, or the path now names another model) it computes
something nobody trained, without any error. So a mismatch is refused with one line; the
user who means it passes ``allow_other_base`` (``--allow-other-base``). A run that recorded no
hash (written before the field existed) is not checked.

The hash costs nothing for a lowrank base: its sealed ``config.json`` (read once, by
``model_dir.inspect``) already records the SHA-256 of ``model.safetensors``, and loading checks
it. A Hugging Face base's weight files, or a GGUF file, are hashed as they are (streamed).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..files.locate import CONFIG_FILE
from ..files.storage import read_json, recorded_digest
from ..files.untrusted import MAX_TENSOR_FILE_BYTES, regular_file
from .model_dir import GGUF, LOWRANK, ModelSource, inspect

FIELD = "base_sha256"


def base_weights_sha256(base) -> str:
    """The SHA-256 of the weights of ``base``: a model directory, a name, or the
    ``model_dir.inspect`` result of one."""
    source = base if isinstance(base, ModelSource) else inspect(base)
    if source.kind == LOWRANK:   # recorded in the config inspect has checked
        return recorded_digest(source.config, "model.safetensors", source.path / CONFIG_FILE)
    if source.kind == GGUF:
        return file_sha256(source.path)
    base = source.path
    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
        h = hashlib.sha256()
        for shard in shards:
            h.update(f"{shard}\0{file_sha256(base / Path(shard).name)}\0".encode())
        return h.hexdigest()
    return file_sha256(base / "model.safetensors")


def file_sha256(path: Path) -> str:
    regular_file(path, MAX_TENSOR_FILE_BYTES, "weight file")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_same_base(run: dict, base, directory, allow_other_base: bool = False) -> None:
    """Refuse ``base`` (a directory, a name or its ``inspect`` result) if ``run`` (the run.json
    of ``directory``) records other base weights."""
    want = run.get(FIELD)
    if want is None:
        return
    have = base_weights_sha256(base)
    if have != want and not allow_other_base:
        raise ValueError(f"{Path(directory) / 'run.json'}: field {FIELD!r} records base weights "
                         f"{want[:12]}…, but {_where(base)} holds other weights ({have[:12]}…): this "
                         "run was trained on another base (rebuilt or replaced since); pass "
                         "--allow-other-base to use it anyway")


def _where(base) -> str:
    return str(base.path if isinstance(base, ModelSource) else base)
