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

Atomicity: each file is written to a temporary file in the same directory, flushed,
fsync'ed, then ``os.replace``d over the target, so a crash leaves either the old or the new
file, never a torn one. ``config.json`` is written last: it refers to the other files.
Each safetensors file also carries a SHA-256 of its tensors in its metadata, so bit rot or
a torn copy made outside this module is reported instead of loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import safetensors.numpy as st

from . import backend
from .module import Module

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FORMAT = "lowrank"
ADAPTER_FORMAT = "lowrank-adapter"
_CHECKSUM_KEY = "lowrank.sha256"
_TENSOR_REF = "__tensor__"

# lowrank parameter name -> PEFT key suffix (other adapter parameters keep their names)
_PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


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
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _write_json(path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def _read_json(path) -> dict:
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


def _host(a) -> np.ndarray:
    return np.ascontiguousarray(backend.to_numpy(a))


def _write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    host = {str(k): _host(v) for k, v in tensors.items()}
    meta = {"format": "np", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    meta[_CHECKSUM_KEY] = _checksum(host)
    return atomic_write(path, st.save(host, metadata=meta))


def _read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of ``path`` as host arrays; any unreadable or corrupt file -> ValueError."""
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
    expected = meta.get(_CHECKSUM_KEY)
    if expected is not None and _checksum(tensors) != expected:
        raise ValueError(f"corrupt safetensors file {path}: checksum mismatch "
                         "(the tensor bytes changed after it was written)")
    return tensors


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


def _split_arrays(obj, path: tuple, tensors: dict, where: str, key=_dotted):
    """JSON skeleton of ``obj`` with arrays moved into ``tensors`` under ``key(path)``."""
    if _is_array(obj):
        name = key(path)
        if name in tensors:
            raise ValueError(f"two arrays in the training state map to the key {name!r}")
        tensors[name] = _host(obj)
        return {_TENSOR_REF: name}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"training state keys must be strings, got {k!r} in {where}")
            if k == _TENSOR_REF:
                raise ValueError(f"the key {_TENSOR_REF!r} is reserved (in {where})")
            out[k] = _split_arrays(v, path + (k,), tensors, where, key)
        return out
    if isinstance(obj, (list, tuple)):
        return [_split_arrays(v, path + (str(i),), tensors, where, key) for i, v in enumerate(obj)]
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


def _join_arrays(obj, tensors: dict, source):
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            key = obj[_TENSOR_REF]
            if key not in tensors:
                raise ValueError(f"training state refers to tensor {key!r}, which "
                                 f"{source} does not hold")
            return tensors[key]
        return {k: _join_arrays(v, tensors, source) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_arrays(v, tensors, source) for v in obj]
    return obj


def _encode_train_state(train_state: dict) -> tuple[dict, dict]:
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
            skeleton[k] = _split_arrays(v, (), tensors, "train_state['optimizer']",
                                        _optimizer_key)
        else:
            skeleton[k] = _split_arrays(v, (k,), tensors, f"train_state[{k!r}]")
    return skeleton, tensors


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


def _write_state_files(directory: Path, config: dict, tensors: dict) -> None:
    """``optimizer.safetensors`` first, then ``config.json`` (which refers to it); a stale
    optimizer file from an older save is removed only once the new config no longer needs it."""
    target = directory / OPTIMIZER_FILE
    if tensors:
        _write_safetensors(target, tensors, {"kind": "train_state"})
    _write_json(directory / CONFIG_FILE, config)
    if not tensors and target.exists():
        target.unlink()


def save_model(model: Module, directory, train_state: dict | None = None) -> Path:
    """Save ``model`` (and optionally the training state) into ``directory``.

    Writes ``model.safetensors`` (keys = parameter names), then ``optimizer.safetensors``
    with the arrays of ``train_state`` (if any), then ``config.json``. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "lowrank_version": _version(),
              "model": _model_config_dict(model), "dtype": _model_dtype(model),
              "train_state": None}
    tensors = {}
    for name, p in model.named_parameters():
        if name in tensors:
            raise ValueError(f"parameter name {name!r} occurs twice in the model")
        tensors[name] = p.data
    _write_safetensors(directory / MODEL_FILE, tensors, {"kind": "model"})
    skeleton, state_tensors = (None, {}) if train_state is None else _encode_train_state(train_state)
    config["train_state"] = skeleton
    _write_state_files(directory, config, state_tensors)
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
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"step must be an integer, got {step!r}")
    state = {"step": int(step), "optimizer": optimizer_state, "rng": rng_state,
             "extra": {} if extra is None else extra}
    skeleton, tensors = _encode_train_state(state)
    config_path = directory / CONFIG_FILE
    config = _read_json(config_path) if config_path.exists() else {"format": FORMAT}
    config["lowrank_version"] = _version()
    config["train_state"] = skeleton
    _write_state_files(directory, config, tensors)
    return directory


def load_training_state(directory) -> dict | None:
    """The ``train_state`` saved in ``directory`` with its arrays restored (host numpy), or
    ``None`` if none was saved. After ``save_training_state`` the dict has ``step``,
    ``optimizer``, ``rng`` and ``extra``."""
    directory = Path(directory)
    config = _read_json(directory / CONFIG_FILE)
    skeleton = config.get("train_state")
    if skeleton is None:
        return None
    source = directory / OPTIMIZER_FILE
    tensors = _read_safetensors(source) if source.exists() else {}
    return _join_arrays(skeleton, tensors, source)   # references carry the exact keys


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
    path = _resolve_weights_file(directory_or_file, MODEL_FILE)
    tensors = _read_safetensors(path)
    expected = dict(model.named_parameters())
    return _check_and_assign(expected, tensors, path, strict)


def read_config(directory) -> dict:
    """The ``config.json`` of a saved model."""
    return _read_json(Path(directory) / CONFIG_FILE)


def load_model(directory, backend: str | None = None):
    """Rebuild a ``lowrank.model.GPT`` from ``directory`` and load its weights.

    ``backend`` ('numpy', 'numpy-strict', 'cupy'; default: the active one) says where the
    parameters live.
    """
    from . import backend as _backend
    from . import model as _model   # lazily: the model module imports much more than we need

    name = backend
    directory = Path(directory)
    config = _read_json(directory / CONFIG_FILE)
    if "model" not in config:
        raise ValueError(f"{directory / CONFIG_FILE} has no 'model' entry (a training-state-"
                         "only directory?)")
    dtype = config.get("dtype") or _backend.DEFAULT_DTYPE
    try:
        gpt_config = _model.GPTConfig(**config["model"])
    except TypeError as exc:
        raise ValueError(f"{directory / CONFIG_FILE}: model config does not fit GPTConfig: "
                         f"{exc}") from exc
    xp = None if name is None else _backend.namespace(name)
    model = _model.GPT(gpt_config, dtype=dtype, xp=xp)
    load_weights(model, directory, strict=True)
    return model


# --- adapters -----------------------------------------------------------------------------

def _adapter_modules(model):
    from .adapters import AdaptedLinear
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no adapter (AdaptedLinear) modules; "
                         "inject adapters first (lowrank.adapters.inject)")
    return found


def _peft_key(module_name: str, param_name: str) -> str:
    head, _, last = param_name.rpartition(".")
    suffix = _PEFT_SUFFIX.get(last, last)
    local = f"{head}.{suffix}" if head else suffix
    return f"{module_name}.{local}" if module_name else local


def _adapter_params(model) -> tuple[dict, dict]:
    """``(file key -> Parameter, file key -> module name)`` of everything an adapter adds.

    That is every parameter of an AdaptedLinear except its frozen base (``weight`` and a
    frozen ``bias``), whether trainable or not: a frozen adapter factor (LoRA-FA's A, a frozen
    SVD factor) is still needed to rebuild the adapted map.
    """
    params, owner = {}, {}
    for mname, m in _adapter_modules(model):
        for pname, p in m.named_parameters():
            if pname in ("weight", "bias") and not p.trainable:
                continue
            key = _peft_key(mname, pname)
            if key in params:
                raise ValueError(f"adapter key {key!r} occurs twice")
            params[key], owner[key] = p, mname
    return params, owner


def _module_metadata(name, m) -> dict:
    meta = {
        "variant": m.variant,
        "config": m.config.to_dict(),
        "in_features": int(m.in_features),
        "out_features": int(m.out_features),
        "dtype": np.dtype(m.dtype).name,
        "merged": bool(m.merged),
        "params": {_peft_key(name, pname): list(p.shape)
                   for pname, p in m.named_parameters()
                   if not (pname in ("weight", "bias") and not p.trainable)},
    }
    hook = getattr(m, "adapter_metadata", None)   # variants may add JSON-able extras
    if callable(hook):
        arrays: dict = {}
        meta["extra"] = _split_arrays(hook(), (), arrays, f"{name}.adapter_metadata()")
        if arrays:
            raise ValueError(f"{name}.adapter_metadata() must be JSON-able; it holds arrays "
                             f"at {sorted(arrays)} (make them Parameters or lists)")
    return meta


def save_adapter(model: Module, directory) -> Path:
    """Write only the adapter: ``adapter_model.safetensors`` (PEFT keys) + ``adapter_config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = _adapter_modules(model)
    params, _ = _adapter_params(model)
    configs = [m.config.to_dict() for _, m in modules]
    targets = sorted({name.rpartition(".")[2] for name, _ in modules})
    info = {
        "format": ADAPTER_FORMAT,
        "lowrank_version": _version(),
        "variant": modules[0][1].variant,
        "config": configs[0] if all(c == configs[0] for c in configs) else None,
        "targets": targets,
        "modules": {name: _module_metadata(name, m) for name, m in modules},
    }
    _write_safetensors(directory / ADAPTER_FILE, {k: p.data for k, p in params.items()},
                       {"kind": "adapter"})
    _write_json(directory / ADAPTER_CONFIG_FILE, info)
    return directory


def read_adapter_config(directory) -> dict:
    """The ``adapter_config.json`` of a saved adapter (``config``, ``targets``, ``modules``)."""
    return _read_json(Path(directory) / ADAPTER_CONFIG_FILE)


def load_adapter(model: Module, directory) -> dict:
    """Load a saved adapter into the AdaptedLinear modules of ``model`` (inject them first,
    with the saved config and targets). Returns the adapter config dict.

    Every adapter key must match: a missing or unexpected key, a shape mismatch, a module of
    another variant, or a merged module raises ValueError and nothing is assigned.
    """
    directory = Path(directory)
    info = read_adapter_config(directory)
    path = _resolve_weights_file(directory, ADAPTER_FILE)
    tensors = _read_safetensors(path)
    params, _ = _adapter_params(model)
    modules = dict(_adapter_modules(model))
    saved_modules = info.get("modules") or {}
    for mname, m in modules.items():
        saved = saved_modules.get(mname)
        if saved is not None and saved.get("variant") != m.variant:
            raise ValueError(f"adapter module {mname!r}: {path} holds a {saved.get('variant')!r} "
                             f"adapter, the model has {m.variant!r}")
        if m.merged:
            raise ValueError(f"adapter module {mname!r} is merged; unmerge() before loading "
                             "adapter weights")
    _check_and_assign(params, tensors, path, strict=True)
    return info


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:   # pragma: no cover
        return "unknown"


__all__ = [
    "MODEL_FILE", "CONFIG_FILE", "OPTIMIZER_FILE", "ADAPTER_FILE", "ADAPTER_CONFIG_FILE",
    "atomic_write", "save_model", "load_weights", "load_model", "read_config",
    "save_training_state", "load_training_state", "save_adapter", "load_adapter",
    "read_adapter_config",
]
