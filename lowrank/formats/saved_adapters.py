"""Adapters rebuilt from a saved config, all or nothing: ``inject_saved(model, directory or
config)`` for lowrank's adapter directories and PEFT's (docs/peft.md#inject-saved), and the
staging that ``peft_files.load_pretrained`` loads into before anything is attached.
"""
from __future__ import annotations

from pathlib import Path

from . import adapter_dir as adapter_files
from ..adapters import (AdaptedLinear, config_from_dict, config_from_peft, peft_codecs,
                        validate_config)
from ..adapters.inject import SEED_STRIDE, _set_child, select_targets
from ..nn.layers import Linear
from ..nn.module import Module
from ..files.schema import ADAPTER_CONFIG_SCHEMA, check
from ..files.storage import read_json



def inject_saved(model: Module, source, seed: int = 0) -> list[str]:
    """Put into ``model`` the adapters a saved config describes: ``source`` is an adapter
    directory (lowrank's or PEFT's) or its ``adapter_config.json`` as a dict. Weights stay at
    their init (load them next: ``checkpoint.load_adapter``); every layer is built before any
    is attached, so a config that does not fit raises a ValueError naming it and leaves
    ``model`` as it was. Returns the adapted module names."""
    if isinstance(source, dict):
        info, where = source, "adapter config"
        if info.get("format") == adapter_files.ADAPTER_FORMAT:
            info = check(info, ADAPTER_CONFIG_SCHEMA, where)
    else:
        info, where = read_config(Path(source))
    if info.get("format") == adapter_files.ADAPTER_FORMAT:
        specs = lowrank_specs(info)
    else:
        validate_config(info, where, peft_codecs())
        if info.get("rank_pattern") or info.get("alpha_pattern"):
            raise ValueError(f"{where}: a config with rank_pattern / alpha_pattern gives each "
                             "module its rank through the names in its directory; load the "
                             "directory (lowrank.load_pretrained)")
        try:
            cfg, targets = config_from_peft(info)
            specs = [(name, cfg) for name, _ in select_targets(model, targets)]
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    staging = build(model, specs, seed, where)
    attach(model, staging.layers, dict.fromkeys(staging.layers, {}), [])
    return list(staging.layers)


def lowrank_specs(info: dict) -> list:
    """``[(module name, config)]`` of lowrank's adapter_config.json (checked by its schema)."""
    return [(name, meta["config"]) for name, meta in (info.get("modules") or {}).items()]


def build(model, specs, seed, where) -> "_Staging":
    """New layers for ``[(module name, config or its dict)]`` over copies of the model's
    Linears, as ``inject`` would seed them; the model is not touched."""
    mods = dict(model.named_modules())
    staging = _Staging()
    for i, (name, cfg) in enumerate(specs):
        linear = mods.get(name)
        if not isinstance(linear, Linear):
            raise ValueError(f"{where}: adapter module {name!r} is not a Linear of this "
                             f"{type(model).__name__}")
        if isinstance(cfg, dict):
            try:
                cfg = config_from_dict(cfg)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{where}: module {name!r}: {exc}") from None
        staging.layers[name] = new_layer(linear, cfg, seed + SEED_STRIDE * i, where)
    by_class: dict = {}
    for layer in staging.layers.values():
        by_class.setdefault(type(layer), []).append(layer)
    for cls, layers in by_class.items():
        cls.after_inject(model, layers)   # what they share (VeRA's projections)
    return staging


class _Staging(Module):
    """New layers under their model names, for a load that must not touch the model yet."""

    def __init__(self):
        self.layers = {}

    def named_children(self):
        yield from self.layers.items()

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, layer in self.layers.items():
            yield from layer.named_modules(name)

    def named_parameters(self, prefix: str = "", trainable_only: bool = False):
        for name, layer in self.layers.items():
            yield from layer.named_parameters(name, trainable_only)


def read_config(directory: Path) -> tuple[dict, str]:
    path = directory / adapter_files.ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not an adapter directory: it has no {adapter_files.ADAPTER_CONFIG_FILE}")
    info = read_json(path)
    if not isinstance(info, dict) or (info.get("format") != adapter_files.ADAPTER_FORMAT
                                      and "peft_type" not in info):
        raise ValueError(f"{path} is neither a PEFT adapter config (no 'peft_type') nor "
                         f"lowrank's (no 'format': {adapter_files.ADAPTER_FORMAT!r})")
    if info.get("format") == adapter_files.ADAPTER_FORMAT:
        info = adapter_files.read_adapter_config(directory)   # sealed: integrity and schema
    return info, str(path)


def new_layer(linear, cfg, seed, where):
    bias = None if linear.bias is None else linear.bias.data
    try:
        return AdaptedLinear(linear.weight.data, bias, cfg, seed=seed)
    except (ValueError, TypeError) as exc:   # a rank the module cannot hold, ...
        raise ValueError(f"{where}: {exc}") from None


def attach(model, new: dict, metas: dict, trained: list) -> None:
    model.freeze()
    for name, layer in new.items():
        _set_child(model, name, layer)
        if metas[name].get("rank_pattern") is not None:
            layer.rank_pattern = metas[name]["rank_pattern"]
    params = dict(model.named_parameters())
    for name in trained:   # PEFT's modules_to_save train on
        params[name].trainable = True
    if any(layer.config.bias == "all" for layer in new.values()):
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.trainable = True


__all__ = ["inject_saved", "read_config", "attach", "new_layer", "build", "lowrank_specs"]
