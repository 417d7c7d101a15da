"""Reading a checkpoint directory as untrusted input (docs/training.md#untrusted-directories).

A directory may come from a crashed run, a careless copy or another person, so every read here
is bounded before it starts: only regular files are opened (a FIFO would block, a symlink to
/dev/zero would never end), a file's size is compared with a cap before its bytes are read,
JSON nesting is bounded before the parser recurses, and a safetensors header is checked
against the file's size and its own shapes before any tensor is allocated. Every refusal is a
one-line ``ValueError`` naming the file (and the key or field).

The JSON that commits a save carries one integrity record (``seal``): the SHA-256 of every data
file of the save and of the JSON itself, so a changed byte anywhere — JSON state such as the
RNG, optimizer step or eps included — is refused, and a missing record is refused too.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np

MAX_JSON_BYTES = 64 << 20          # JSON metadata and histories are far smaller
MAX_JSON_DEPTH = 64                # the deepest lowrank JSON nests about 8 levels
MAX_HEADER_BYTES = 100 << 20       # safetensors' own limit on a header
MAX_TENSOR_FILE_BYTES = int(os.environ.get("LOWRANK_MAX_FILE_BYTES", 64 << 30))

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16,
          "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
DTYPE_CODES = {np.dtype(v).str: k for k, v in DTYPES.items()}


def regular_file(path, max_bytes: int, what: str = "file") -> int:
    """The size of ``path`` if it is a regular file (a symlink to one counts) of at most
    ``max_bytes``; a FIFO, device, directory or oversized file -> ValueError, a missing one ->
    FileNotFoundError."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} {path} is not a regular file (a directory, FIFO, device or "
                         "socket); refusing to read it")
    if info.st_size > max_bytes:
        raise ValueError(f"{what} {path} has {info.st_size:,} bytes, more than the "
                         f"{max_bytes:,} a {what} may have")
    return info.st_size


def read_bytes(path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (re-checked on the open descriptor:
    the file may be swapped between the check and the open)."""
    regular_file(path, max_bytes, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            raise ValueError(f"{what} {path} changed while it was opened; refusing to read it")
        try:   # not max_bytes + 1: read() allocates what it asks
            data = fh.read(info.st_size + 1)
        except OSError as exc:   # /proc/self/mem and the like: "regular", but unreadable
            raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > info.st_size:
        raise ValueError(f"{what} {path} grew while it was read; refusing it")
    return data


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(data: bytes, chunk: int = 1 << 20) -> int:
    """The deepest nesting of brackets outside strings (no recursion, linear time; counted a
    chunk at a time, so the counts take a few MB whatever the file's size)."""
    text = _STRING.sub(b'""', data) if len(data) <= chunk else _strings_emptied(data)
    deepest = depth = 0
    for start in range(0, len(text), chunk):
        part = np.frombuffer(text, dtype=np.uint8, count=min(chunk, len(text) - start),
                             offset=start)
        step = ((part == ord("[")) | (part == ord("{"))).astype(np.int32) \
            - ((part == ord("]")) | (part == ord("}"))).astype(np.int32)
        running = np.cumsum(step, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


def _strings_emptied(data: bytes) -> bytes:
    """``_STRING.sub(b'""', data)`` without its list of pieces (10⁶ short strings would take
    hundreds of MB): the pieces are written out as they are found."""
    out, last = io.BytesIO(), 0
    for m in _STRING.finditer(data):
        out.write(data[last:m.start()])
        out.write(b'""')
        last = m.end()
    out.write(data[last:])
    return out.getvalue()


def parse_json(data: bytes, source, max_depth: int = MAX_JSON_DEPTH):
    """JSON from bytes, with its nesting bounded before the parser recurses."""
    depth = json_depth(data)
    if depth > max_depth:
        raise ValueError(f"JSON file {source} nests {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"cannot parse JSON file {source}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def load_json_file(path, max_bytes: int = MAX_JSON_BYTES):
    return parse_json(read_bytes(path, max_bytes, "JSON file"), path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- one integrity record per save -----------------------------------------------------------

INTEGRITY_KEY = "integrity"


def _digest(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != INTEGRITY_KEY}
    body[INTEGRITY_KEY] = {k: v for k, v in (obj.get(INTEGRITY_KEY) or {}).items()
                           if k != "sha256"}
    text = json.dumps(body, sort_keys=True, allow_nan=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(obj: dict, digests: dict | None = None) -> dict:
    """``obj`` with its integrity record: the SHA-256 of every data file it lists in
    ``files`` (this save's ``digests``, or the record an earlier save left) and of the JSON
    itself, so a changed byte anywhere in the save — JSON state included — is refused."""
    old = (obj.get(INTEGRITY_KEY) or {}).get("files") or {}
    known = {**old, **(digests or {})}
    files = {name: known[name] for name in (obj.get("files") or {}) if name in known}
    obj[INTEGRITY_KEY] = {"files": files}
    obj[INTEGRITY_KEY]["sha256"] = _digest(obj)
    return obj


def verify_seal(obj: dict, path, version: str) -> dict:
    """``obj`` (read from ``path``) if its integrity record matches; else ValueError."""
    record = obj.get(INTEGRITY_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ValueError(f"{path} has no integrity record (written before lowrank {version} "
                         "added them, or edited by hand); refusing to load it: save it again "
                         "with this version")
    if not isinstance(record.get("files", {}), dict) or _digest(obj) != record["sha256"]:
        raise ValueError(f"{path} does not match its integrity record: the file was changed "
                         "or corrupted after it was written")
    return obj


# --- safetensors -------------------------------------------------------------------------------

def parse_safetensors_header(data: bytes, file_size: int, source) -> tuple[dict, dict, int]:
    """``(entries, metadata, data start)`` of a safetensors file from its first bytes: every
    entry's dtype, shape and offsets are checked against each other and against the file's
    size, so nothing is allocated for a header that lies."""
    if file_size < 8 or len(data) < 8:
        raise ValueError(f"corrupt safetensors file {source}: {file_size} bytes is shorter "
                         "than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise ValueError(f"corrupt safetensors file {source}: a header of {n:,} bytes does not "
                         f"fit the file's {file_size:,} bytes")
    header = parse_json(bytes(data[8:8 + n]), source, max_depth=4)
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file {source}: the header is not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"corrupt safetensors file {source}: __metadata__ must map to strings")
    entries, spans = {}, []
    for key, e in header.items():
        where = f"safetensors file {source}, tensor {key!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"corrupt {where}: entry must have dtype, shape, data_offsets")
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{where}: unsupported dtype {e['dtype']!r}")
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(_count(d) for d in shape)):
            raise ValueError(f"corrupt {where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))
                and offsets[0] <= offsets[1]):
            raise ValueError(f"corrupt {where}: data_offsets {offsets!r}")
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[e["dtype"]]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"corrupt {where}: shape {tuple(shape)} of {e['dtype']} needs "
                             f"{nbytes:,} bytes, its offsets span {offsets[1] - offsets[0]:,}")
        entries[key] = (e["dtype"], tuple(shape), tuple(offsets))
        spans.append(tuple(offsets))
    spans.sort()
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise ValueError(f"corrupt safetensors file {source}: tensor data overlaps or "
                             f"leaves a gap at byte {begin:,}")
        end = stop
    if 8 + n + end != file_size:
        raise ValueError(f"corrupt safetensors file {source}: the header describes "
                         f"{8 + n + end:,} bytes, the file has {file_size:,}")
    return entries, meta, 8 + n


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


def read_head(path, size: int) -> bytes:
    """The first bytes of a safetensors file: the length and the (bounded) header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            return head + fh.read(min(n, MAX_HEADER_BYTES, max(size - 8, 0)))
    except OSError as exc:
        raise ValueError(f"cannot read safetensors file {path}: {exc.strerror or exc}") from None


def read_safetensors_file(path, expected_shapes: dict | None = None,
                          max_bytes: int = MAX_TENSOR_FILE_BYTES):
    """``(tensors, metadata, sha256 of the file)``. ``expected_shapes`` (key -> shape) is
    checked against the header before the tensor data are read."""
    size = regular_file(path, max_bytes, "safetensors file")
    entries, meta, start = parse_safetensors_header(read_head(path, size), size, path)
    for key, shape in (expected_shapes or {}).items():
        if key in entries and entries[key][1] != tuple(shape):
            raise ValueError(f"shape mismatch for key {key!r} in {path}: file has "
                             f"{entries[key][1]}, model has {tuple(shape)}")
    data = read_bytes(path, size, "safetensors file")
    if len(data) != size:
        raise ValueError(f"safetensors file {path} changed size while it was read")
    tensors = {}
    for key, (code, shape, (begin, stop)) in entries.items():
        tensors[key] = np.frombuffer(data, dtype=np.dtype(DTYPES[code]).newbyteorder("<"),
                                     count=int(np.prod(shape, dtype=np.int64)),
                                     offset=start + begin).reshape(shape).copy()
    return tensors, meta, sha256(data)
