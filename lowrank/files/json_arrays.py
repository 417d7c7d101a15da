"""Training state and metadata as JSON with the arrays split out (host-side I/O,
docs/conventions.md#host-io): ``split_arrays`` turns a nested dict/list holding arrays into a
JSON skeleton whose arrays are ``{"__tensor__": key}`` references into a tensor dict (stored
as one safetensors file); ``join_arrays`` puts them back. The skeleton records every key, so
loading needs no naming rule.
"""
from __future__ import annotations

import numpy as np

from .. import backend

TENSOR_REF = "__tensor__"


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
        tensors[name] = np.ascontiguousarray(backend.to_numpy(obj))
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
