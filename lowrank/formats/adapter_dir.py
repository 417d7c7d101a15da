"""Adapter files: ``adapter_model.safetensors`` (PEFT keys) + ``adapter_config.json``.

Only what an adapter adds is saved — every parameter of each ``AdaptedLinear`` except its
frozen base — under PEFT's key names (``blocks.0.attn.q.lora_A.weight``), with the variant's
config and per-module metadata. Loading expects the same adapters injected into the same base
(``workflows.load_finetuned`` re-injects from the saved config). ``lowrank.formats.checkpoint``
re-exports these functions; the format: docs/training.md#adapter-files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .._version import __version__
from ..adapters import AdaptedLinear
from ..adapters._peft import check_tensors
from ..files.json_arrays import split_arrays
from ..nn.module import Module
from ..files.schema import ADAPTER_CONFIG_SCHEMA, check
from ..files.storage import (StagedFiles, cap_for, check_and_assign, read_saved_tensors,
                             read_sealed_json, stage, stage_state)

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT = "lowrank-adapter"

# lowrank parameter name -> PEFT key suffix (other adapter parameters keep their names)
_PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


def _adapter_modules(model):
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
                if not (pname == "weight" and m.saves_base_weight()):
                    continue
                pname = "base_layer.weight"   # a base the variant rewrites in training (ReLoRA)
            key = _peft_key(mname, pname)
            if key in params:
                raise ValueError(f"adapter key {key!r} occurs twice")
            params[key], owner[key] = p, mname
    if any(m.config.bias == "all" for _, m in _adapter_modules(model)):
        # PEFT's bias="all" trains every bias of the model (LayerNorm's too): they are part of
        # what was fine-tuned, so they travel with the adapter under their own names
        inside = tuple(f"{mname}." for mname, _ in _adapter_modules(model))
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and p.trainable and not pname.startswith(inside):
                params[pname], owner[pname] = p, ""
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
    meta["params"].update({k: list(a.shape) for k, a in _exported_tensors(name, m).items()})
    extra = m.adapter_metadata()   # variants may add JSON-able extras
    if extra:
        arrays: dict = {}
        meta["extra"] = split_arrays(extra, (), arrays, f"{name}.adapter_metadata()")
        if arrays:
            raise ValueError(f"{name}.adapter_metadata() must be JSON-able; it holds arrays "
                             f"at {sorted(arrays)} (make them Parameters or lists)")
    return meta


def _exported_tensors(name, m) -> dict:
    """File key -> array for a module that saves its parameters in another shape than it holds
    them (``adapter_tensors() -> {param name: array}``; AdaLoRA keeps only its active triplets).
    ``expand_adapter_tensors(tensors, extra)`` is its inverse at load time."""
    return {_peft_key(name, pname): a for pname, a in m.adapter_tensors().items()}


def save_adapter(model: Module, directory, train_state: dict | None = None) -> Path:
    """Write only the adapter: ``adapter_model.safetensors`` (PEFT keys) + ``adapter_config.json``;
    with ``train_state`` also ``optimizer.safetensors``, the state recorded in
    adapter_config.json — one save with one commit point, so a crash never pairs an adapter
    with another step's optimizer state."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = _adapter_modules(model)
    params, _ = _adapter_params(model)
    configs = [m.config.to_dict() for _, m in modules]
    targets = sorted({name.rpartition(".")[2] for name, _ in modules})
    info = {
        "format": ADAPTER_FORMAT,
        "lowrank_version": __version__,
        "variant": modules[0][1].variant,
        "config": configs[0] if all(c == configs[0] for c in configs) else None,
        "targets": targets,
        "modules": {name: _module_metadata(name, m) for name, m in modules},
    }
    tensors = {k: p.data for k, p in params.items()}
    for name, m in modules:
        exported = _exported_tensors(name, m)
        if set(exported) - set(params):
            raise ValueError(f"{name}.adapter_tensors() names no parameter of the module: "
                             f"{sorted(set(exported) - set(params))}")
        tensors.update(exported)
    files: dict = {}
    with StagedFiles() as staged:   # adapter, state and their JSON: one save, one commit
        stage(staged, directory / ADAPTER_FILE, tensors, "adapter", files)
        stale = stage_state(staged, directory, info, train_state, files)
        staged.commit(directory / ADAPTER_CONFIG_FILE, info, remove=stale)
    return directory


def read_adapter_config(directory) -> dict:
    """The ``adapter_config.json`` of a saved adapter (``config``, ``targets``, ``modules``),
    its integrity record and schema checked."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    return check(read_sealed_json(path), ADAPTER_CONFIG_SCHEMA, str(path))


def load_adapter(model: Module, directory) -> dict:
    """Load a saved adapter into the AdaptedLinear modules of ``model`` (inject them first,
    with the saved config and targets). Returns the adapter config dict.

    Every adapter key must match: a missing or unexpected key, a shape mismatch, a module of
    another variant, or a merged module raises ValueError and nothing is assigned.
    """
    directory = Path(directory)
    info = read_adapter_config(directory)
    params, _ = _adapter_params(model)
    path, tensors = read_saved_tensors(directory, info, ADAPTER_FILE,
                                       directory / ADAPTER_CONFIG_FILE,
                                       max_bytes=cap_for(params.values()))
    integral = {k for k, p in params.items() if np.dtype(p.dtype).kind in "iub"}   # RoSA's indices
    check_tensors({k: a for k, a in tensors.items() if k not in integral}, path)
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
        # saved in another shape (adapter_tensors): back to the module's
        keys = {pname: _peft_key(mname, pname) for pname, _ in m.named_parameters()}
        local = {pname: tensors[k] for pname, k in keys.items() if k in tensors}
        extra = (saved or {}).get("extra") or {}
        tensors.update({keys[pname]: a
                        for pname, a in m.expand_adapter_tensors(local, extra).items()})
    check_and_assign(params, tensors, path, strict=True)
    for mname, m in modules.items():
        m.load_adapter_metadata((saved_modules.get(mname) or {}).get("extra") or {})
    return info


