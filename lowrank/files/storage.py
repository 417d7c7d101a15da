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
import re
import tempfile
import uuid
from pathlib import Path

import numpy as np
import safetensors.numpy as st

from .. import backend
from .._version import __version__
from .json_arrays import encode_train_state
from .untrusted import (INTEGRITY_KEY, load_json_file, parse_safetensors_header, read_head,
                        read_safetensors_file, regular_file, seal, sha256, verify_seal)

CHECKSUM_KEY = "lowrank.sha256"
SAVE_ID_KEY = "lowrank.save_id"
OPTIMIZER_FILE = "optimizer.safetensors"
TEMP_SUFFIX = ".lowrank-tmp"     # our temporaries: ``.<name>.<random>.lowrank-tmp``
_HEX32 = re.compile(r"[0-9a-f]{32}")


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
    _remove_temporaries(path)   # a killed earlier write's (one writer per directory)
    tmp = _write_temp(path, data.encode("utf-8") if isinstance(data, str) else data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _file_mode() -> int:
    """0666 less the process umask: what ``open`` would give (mkstemp always gives 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_temp(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:   # a full disk, a size limit
            exc.filename = str(path)                            # names the file it hit
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
        self.digests: dict[str, str] = {}            # file name -> SHA-256 of its bytes

    def add(self, path, data: bytes | str) -> Path:
        path = Path(path)
        data = data.encode("utf-8") if isinstance(data, str) else data
        _remove_temporaries(path)
        self._pending.append((_write_temp(path, data), path))
        self.digests[path.name] = sha256(data)
        return path

    def commit(self, json_path, obj: dict | bytes, remove=()) -> None:
        """Commit the save: ``obj`` sealed (``seal``) becomes ``json_path`` (bytes are written
        as they are: another tool's format); ``remove``: canonical files the new JSON no
        longer refers to."""
        json_data = obj if isinstance(obj, bytes) else json_bytes(seal(obj, self.digests))
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
    tmp = canonical.with_name(f".{canonical.name}.{new_save_id()}{TEMP_SUFFIX}")
    try:
        os.link(source, tmp)
    except OSError:
        import shutil
        shutil.copyfile(source, tmp)
    os.replace(tmp, canonical)


def _remove_versions(path: Path) -> None:
    """Delete the ``<stem>.<save id><suffix>`` files beside ``path`` that a save wrote (left by
    earlier, cut-short saves; one writer per directory): a file counts as ours only when its
    header carries the save id of its name, so a user's file of that name pattern is kept."""
    for old in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        version = old.name[len(path.stem) + 1:len(old.name) - len(path.suffix)]
        if _HEX32.fullmatch(version):
            try:
                ours = read_safetensors_metadata(old).get(SAVE_ID_KEY) == version
            except (ValueError, OSError):
                ours = False
            if ours:
                _unlink(old)
    _remove_temporaries(path)


def _remove_temporaries(path: Path) -> None:
    """Delete ``.<name>.<random>.lowrank-tmp`` files beside ``path`` (a killed save's)."""
    for tmp in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        if tmp.is_file() and not tmp.is_symlink():
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
    """A JSON object from a regular file of bounded size and nesting; anything else ->
    ValueError naming the file."""
    path = Path(path)
    obj = load_json_file(path)
    if not isinstance(obj, dict):
        raise ValueError(f"JSON file {path} holds a {type(obj).__name__}, not an object")
    return obj


# --- one integrity record per save ------------------------------------------------------------

def read_sealed_json(path) -> dict:
    """``read_json`` of a file written with ``seal``; no record or a mismatch -> ValueError."""
    return verify_seal(read_json(path), path, __version__)


def write_sealed_json(path, obj: dict) -> Path:
    return atomic_write(path, json_bytes(seal(dict(obj))))


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


def read_safetensors(path, sha: str | None = None, expected_shapes: dict | None = None,
                     max_bytes: int | None = None):
    """All tensors of ``path`` as host arrays; any unreadable or corrupt file -> ValueError."""
    return read_safetensors_with_metadata(path, sha, expected_shapes, max_bytes)[0]


def read_safetensors_with_metadata(path, sha: str | None = None,
                                   expected_shapes: dict | None = None,
                                   max_bytes: int | None = None):
    """``(tensors, metadata)`` of ``path``, checked against ``sha`` (the SHA-256 of the file a
    save recorded) and the checksum the file carries; the header is validated (and
    ``expected_shapes`` compared) before any tensor is read."""
    path = Path(path)
    tensors, meta, digest = read_safetensors_file(path, expected_shapes,
                                                  **({} if max_bytes is None else
                                                     {"max_bytes": max_bytes}))
    if sha is not None and digest != sha:
        raise ValueError(f"corrupt safetensors file {path}: its SHA-256 differs from the one "
                         "the save recorded (changed, swapped or from another save)")
    expected = meta.get(CHECKSUM_KEY)
    if expected is not None and _checksum(tensors) != expected:
        raise ValueError(f"corrupt safetensors file {path}: checksum mismatch "
                         "(the tensor bytes changed after it was written)")
    return tensors, meta


def read_safetensors_metadata(path) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its (bounded) header alone."""
    path = Path(path)
    size = regular_file(path, 1 << 62, "safetensors file")
    return parse_safetensors_header(read_head(path, size), size, path)[1]


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


def recorded_digest(config: dict, name: str, source) -> str:
    """The SHA-256 the save ``config`` recorded for its file ``name``."""
    digest = ((config.get(INTEGRITY_KEY) or {}).get("files") or {}).get(name)
    if not isinstance(digest, str):
        raise ValueError(f"{source} records no SHA-256 for {name} in its integrity record; "
                         "refusing to load an unverified file")
    return digest


def read_saved_tensors(directory, config: dict, name: str, source,
                       expected_shapes: dict | None = None, max_bytes: int | None = None):
    """``(path, tensors)`` of the file ``name`` the save ``config`` (read from ``source``)
    records, verified against the digest it recorded; ``max_bytes`` caps the file's size."""
    path = saved_file(directory, config, name)
    return path, read_safetensors(path, recorded_digest(config, name, source), expected_shapes,
                                  max_bytes)


def cap_for(params, copies: int = 1) -> int:
    """A size cap for a file holding ``copies`` float64 arrays per parameter (plus headers)."""
    return copies * 8 * sum(int(p.data.size) for p in params) + (1 << 20)


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
