"""Files that survive crashes: atomic writes, staged sets of files, safetensors with a
checksum, and the pieces every checkpoint shares: a training state whose arrays live in a
safetensors file, the file a save recorded, checked assignment of loaded tensors (host-side
I/O, docs/conventions.md#host-io; the formats: docs/training.md#checkpoints).

Atomicity: each file is written to a temporary file in the same directory, flushed,
fsync'ed, then ``os.replace``d over the target, so a crash leaves either the old or the new
file, never a torn one. A *set* of files (weights, optimizer state, the JSON that refers to
them) is written with ``StagedFiles``: data files under versioned names first, then the JSON
as the one commit point, so a crash at any moment leaves a whole save to load (see there).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import uuid
from pathlib import Path

import numpy as np
import safetensors.numpy as st

from . import backend
from ._version import __version__
from .json_arrays import encode_train_state

CHECKSUM_KEY = "lowrank.sha256"
SAVE_ID_KEY = "lowrank.save_id"
OPTIMIZER_FILE = "optimizer.safetensors"


# --- atomic files ------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, replace.

    On any failure the temporary file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    tmp = _write_temp(path, data.encode("utf-8") if isinstance(data, str) else data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _write_temp(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def new_save_id() -> str:
    return uuid.uuid4().hex


def versioned(path, save_id: str) -> Path:
    """Where one save keeps a data file: ``model.safetensors`` -> ``model.<save_id>.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{save_id}{path.suffix}")


class StagedFiles:
    """One save of a directory: data files plus the JSON that records them, crash-safe.

    ``add`` writes each data file in full under a temporary name. ``commit(json_path, data)``
    then (1) renames every data file to its versioned name (``versioned``; no existing file is
    touched), (2) replaces the JSON — the single commit point, which records the save id of
    every file — and (3) moves each version onto its canonical name (``model.safetensors``,
    what other tools open). A crash before (2) leaves the previous save whole; after it,
    ``resolve_saved`` finds the new files by their versions until (3) completes.
    Leaving the ``with`` block on an error removes the temporaries.
    """

    def __init__(self):
        self.save_id = new_save_id()
        self._pending: list[tuple[str, Path]] = []   # (temporary, canonical path)

    def add(self, path, data: bytes | str) -> Path:
        path = Path(path)
        self._pending.append((_write_temp(path, data.encode("utf-8") if isinstance(data, str)
                                          else data), path))
        return path

    def commit(self, json_path, json_data: bytes, remove=()) -> None:
        """Commit the save; ``remove``: canonical files the new JSON no longer refers to."""
        for tmp, path in self._pending:
            os.replace(tmp, versioned(path, self.save_id))
        for directory in {path.parent for _, path in self._pending}:
            _fsync_dir(directory)
        atomic_write(json_path, json_data)                       # the commit point
        pending, self._pending = self._pending, []
        for _, path in pending:   # canonical now holds this save: no version is needed
            _publish(versioned(path, self.save_id), path)
            _remove_versions(path)
        for path in remove:
            _remove_versions(Path(path))
            _unlink(path)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        for tmp, _ in self._pending:
            _unlink(tmp)
        self._pending = []
        return False


def _publish(source: Path, canonical: Path) -> None:
    """Make ``canonical`` the same file as ``source`` (a hard link, a copy where links fail)."""
    tmp = canonical.with_name(f".{canonical.name}.{new_save_id()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        import shutil
        shutil.copyfile(source, tmp)
    os.replace(tmp, canonical)


def _remove_versions(path: Path) -> None:
    """Delete ``<stem>.<save id><suffix>`` files and temporaries beside ``path`` (left by
    earlier, cut-short saves; one writer per directory)."""
    for old in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        version = old.name[len(path.stem) + 1:len(old.name) - len(path.suffix)]
        if len(version) == 32 and all(c in "0123456789abcdef" for c in version):
            _unlink(old)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):   # a killed save's temporaries
        _unlink(tmp)


def resolve_saved(directory, name: str, save_id) -> Path:
    """The file ``name`` of the save ``save_id`` recorded (``None``: the canonical file)."""
    canonical = Path(directory) / name
    if save_id is None:
        return canonical
    kept = versioned(canonical, save_id)
    if kept.is_file():
        return kept
    if canonical.is_file():
        check_same_save(Path(directory), save_id, canonical,
                        read_safetensors_metadata(canonical).get(SAVE_ID_KEY))
    return canonical


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode("utf-8")


def write_json(path, obj) -> Path:
    return atomic_write(path, json_bytes(obj))


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read JSON file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"JSON file {path} does not hold an object")
    return obj


# --- safetensors with a checksum ----------------------------------------------------------

def _checksum(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        h.update(json.dumps([key, a.dtype.str, list(a.shape)]).encode("utf-8"))
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()


def host_copy(a) -> np.ndarray:
    return np.ascontiguousarray(backend.to_numpy(a))


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """The file's bytes: host copies of ``tensors``, ``metadata`` and a checksum."""
    host = {str(k): host_copy(v) for k, v in tensors.items()}
    meta = {"format": "np", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    meta[CHECKSUM_KEY] = _checksum(host)
    return st.save(host, metadata=meta)


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    return atomic_write(path, safetensors_bytes(tensors, metadata))


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of ``path`` as host arrays; any unreadable or corrupt file -> ValueError."""
    return read_safetensors_with_metadata(path)[0]


def read_safetensors_with_metadata(path) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, metadata)`` of ``path``; any unreadable or corrupt file -> ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read checkpoint file {path}: {exc}") from exc
    try:
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes is shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", data[:8])
        if 8 + n > len(data):
            raise ValueError(f"header of {n} bytes runs past the end of the file")
        header = json.loads(data[8:8 + n].decode("utf-8"))
        meta = header.get("__metadata__") or {}
        tensors = {k: (a if a.flags.writeable else a.copy()) for k, a in st.load(data).items()}
    except Exception as exc:  # SafetensorError, ValueError, JSON and Unicode errors
        raise ValueError(f"corrupt or unreadable safetensors file {path}: "
                         f"{type(exc).__name__}: {exc}") from exc
    expected = meta.get(CHECKSUM_KEY)
    if expected is not None and _checksum(tensors) != expected:
        raise ValueError(f"corrupt safetensors file {path}: checksum mismatch "
                         "(the tensor bytes changed after it was written)")
    return tensors, meta


def read_safetensors_metadata(path) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its header alone."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n).decode("utf-8"))
    except Exception as exc:   # short file, bad JSON, unreadable
        raise ValueError(f"corrupt or unreadable safetensors file {path}: "
                         f"{type(exc).__name__}: {exc}") from exc
    return header.get("__metadata__") or {}


def check_same_save(where, id_a, path_b, id_b) -> None:
    """Files written by one save carry one save_id; a mix means files were copied apart."""
    if id_a is not None and id_b is not None and id_a != id_b:
        raise ValueError(f"{where} records save {id_a}, but {path_b} comes from save {id_b} "
                         "and that save's own file is missing: files of different saves "
                         "were mixed")


# --- what model and adapter checkpoints share -----------------------------------------------

def stage(staged: StagedFiles, path: Path, tensors: dict, kind: str, files: dict) -> None:
    """Add a safetensors file stamped with the save's id; record the id for the JSON."""
    staged.add(path, safetensors_bytes(tensors, {"kind": kind, SAVE_ID_KEY: staged.save_id}))
    files[path.name] = staged.save_id


def stage_state(staged, directory: Path, config: dict, train_state, files: dict) -> list:
    """Stage the training state's arrays (``optimizer.safetensors``) and record the state in
    ``config`` (the JSON the caller commits); returns files the new save no longer needs."""
    skeleton, tensors = (None, {}) if train_state is None else encode_train_state(train_state)
    stale = []
    if tensors:
        stage(staged, directory / OPTIMIZER_FILE, tensors, "train_state", files)
    elif files.pop(OPTIMIZER_FILE, None) is not None or (directory / OPTIMIZER_FILE).exists():
        stale.append(directory / OPTIMIZER_FILE)
    config.update(lowrank_version=__version__, train_state=skeleton, files=files)
    return stale


def saved_file(directory, config: dict, name: str) -> Path:
    """The file ``name`` of the save ``config`` (a committed JSON) records: its own version,
    whatever a later save cut short left under the canonical name."""
    return resolve_saved(directory, name, (config.get("files") or {}).get(name))


def resolve_weights_file(directory_or_file, default_name: str) -> Path:
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def check_and_assign(expected: dict, tensors: dict, source, strict: bool) -> tuple[list, list]:
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
