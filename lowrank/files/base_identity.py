"""Which base an adapter was trained on (docs/training.md#checkpoints): ``run.json`` records
the SHA-256 of the base's weights, and applying the adapter (``eval``, ``generate``) or
resuming its run checks it.

An adapter is a small correction to one particular set of weights: applied to another base
(``pretrain --out base --force`` rebuilt it, or the path now names another model) it computes
something nobody trained, without any error. So a mismatch is refused with one line; the
user who means it passes ``allow_other_base`` (``--allow-other-base``). A run that recorded no
hash (written before the field existed) is not checked.

The hash costs nothing for a lowrank base: its sealed ``config.json`` already records the
SHA-256 of ``model.safetensors`` (and loading checks it). A Hugging Face base's weight files are
hashed as they are (streamed).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .locate import gguf_file
from .storage import read_json, read_sealed_json, recorded_digest
from .untrusted import MAX_TENSOR_FILE_BYTES, regular_file

FIELD = "base_sha256"


def base_weights_sha256(base) -> str:
    """The SHA-256 of the weights of the base model directory ``base`` (or of the GGUF file a
    ``.gguf`` path or ``smollm2`` names: the file is the weights)."""
    file = gguf_file(base)
    if file is not None:
        return _file_sha256(file)
    base = Path(base)
    config = base / "config.json"
    if config.is_file() and "format" in read_json(config):   # a lowrank checkpoint
        return recorded_digest(read_sealed_json(config), "model.safetensors", config)
    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
        h = hashlib.sha256()
        for shard in shards:
            h.update(f"{shard}\0{_file_sha256(base / Path(shard).name)}\0".encode())
        return h.hexdigest()
    return _file_sha256(base / "model.safetensors")


def _file_sha256(path: Path) -> str:
    regular_file(path, MAX_TENSOR_FILE_BYTES, "weight file")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_same_base(run: dict, base, directory, allow_other_base: bool = False) -> None:
    """Refuse ``base`` if ``run`` (the run.json of ``directory``) records other base weights."""
    want = run.get(FIELD)
    if want is None:
        return
    have = base_weights_sha256(base)
    if have != want and not allow_other_base:
        raise ValueError(f"{Path(directory) / 'run.json'}: field {FIELD!r} records base weights "
                         f"{want[:12]}…, but {base} holds other weights ({have[:12]}…): this "
                         "run was trained on another base (rebuilt or replaced since); pass "
                         "--allow-other-base to use it anyway")
