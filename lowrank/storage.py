"""Files that survive crashes: atomic writes, staged sets of files, safetensors with a
checksum, and JSON state whose arrays live in a safetensors file (host-side I/O, SPEC §0).

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

CHECKSUM_KEY = "lowrank.sha256"
SAVE_ID_KEY = "lowrank.save_id"
TENSOR_REF = "__tensor__"


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


# --- JSON state with arrays split out ---------------------------------------------------------

def _is_array(v) -> bool:
    if isinstance(v, np.ndarray):
        return True
    try:
        backend.backend_of(v)
    except ValueError:
        return False
    return not isinstance(v, np.generic)


def _dotted(path: tuple) -> str:
    return ".".join(path)


def split_arrays(obj, path: tuple, tensors: dict, where: str, key=_dotted):
    """JSON skeleton of ``obj`` with arrays moved into ``tensors`` under ``key(path)``."""
    if _is_array(obj):
        name = key(path)
        if name in tensors:
            raise ValueError(f"two arrays in the training state map to the key {name!r}")
        tensors[name] = host_copy(obj)
        return {TENSOR_REF: name}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"training state keys must be strings, got {k!r} in {where}")
            if k == TENSOR_REF:
                raise ValueError(f"the key {TENSOR_REF!r} is reserved (in {where})")
            out[k] = split_arrays(v, path + (k,), tensors, where, key)
        return out
    if isinstance(obj, (list, tuple)):
        return [split_arrays(v, path + (str(i),), tensors, where, key) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"cannot store a {type(obj).__name__} at {_dotted(path) or '<root>'} of "
                     f"{where} in a checkpoint (use JSON values or arrays)")


def _optimizer_key(path: tuple) -> str:
    """``exp_avg.<param name>`` for per-parameter moments (``{"state": {name: {"exp_avg":
    a}}}`` as AdamW.state_dict() has it, or ``{"exp_avg": {name: a}}``); else the dotted path."""
    if len(path) == 3 and path[0] == "state":
        return f"{path[2]}.{path[1]}"
    return _dotted(path)


def join_arrays(obj, tensors: dict, source):
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_REF}:
            key = obj[TENSOR_REF]
            if key not in tensors:
                raise ValueError(f"training state refers to tensor {key!r}, which "
                                 f"{source} does not hold")
            return tensors[key]
        return {k: join_arrays(v, tensors, source) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_arrays(v, tensors, source) for v in obj]
    return obj


def encode_train_state(train_state: dict) -> tuple[dict, dict]:
    """Split a train state into its JSON skeleton and its arrays.

    Arrays under ``train_state["optimizer"]`` get keys relative to it, per-parameter moments
    as ``exp_avg.<param name>`` (torch/PEFT-like); arrays elsewhere keep their full dotted
    path (``rng.key``). The skeleton stores the exact key of every array, so loading needs
    no naming rule.
    """
    if not isinstance(train_state, dict):
        raise ValueError(f"train_state must be a dict, got {type(train_state).__name__}")
    tensors: dict = {}
    skeleton = {}
    for k, v in train_state.items():
        if not isinstance(k, str):
            raise ValueError(f"train_state keys must be strings, got {k!r}")
        if k == "optimizer":
            skeleton[k] = split_arrays(v, (), tensors, "train_state['optimizer']",
                                        _optimizer_key)
        else:
            skeleton[k] = split_arrays(v, (k,), tensors, f"train_state[{k!r}]")
    return skeleton, tensors
