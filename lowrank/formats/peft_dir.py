"""``save_pretrained`` / ``load_pretrained``: adapter directories that PEFT loads, and PEFT's
(or lowrank's) directories loaded into a lowrank model (docs/peft.md).

``save_pretrained(model, dir)`` writes PEFT's ``adapter_model.safetensors`` (keys
``base_model.model.<module>.lora_A.weight`` ...) and ``adapter_config.json`` (PEFT's fields,
lowrank's beside them under ``"lowrank"``) for lora, rsLoRA, DoRA, AdaLoRA and (through
``peft_lycoris``) VeRA, LoHa, LoKr; PiSSA, OLoRA and MiLoRA are re-expressed over the original
base (docs/peft.md#pissa). Variants PEFT lacks
save in lowrank's own format (``adapter_files``), with no ``peft_type``.

``load_pretrained(model, dir)`` reads either format. Everything is checked and built in new
layers first; the model is changed only when all of it fits, so a bad directory raises a
one-line ValueError and leaves the model as it was.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import adapter_dir as adapter_files, hf_model as pretrained
from . import peft_names as pf
from . import peft_lycoris as pl
from .._version import __version__
from ..adapters import AdaptedLinear, config, config_from_dict
from ..adapters.inject import (SEED_STRIDE, _set_child, adapted_modules, adapter_names,
                               set_adapter, stash_active)
from ..nn.layers import Linear
from ..nn.module import Module
from ..files.storage import (StagedFiles, check_and_assign, host_copy, json_bytes, read_json,
                             read_safetensors, safetensors_bytes)

CONFIG_FILE = adapter_files.ADAPTER_CONFIG_FILE
WEIGHTS_FILE = adapter_files.ADAPTER_FILE
DATA_DRIVEN = ("pissa", "olora", "milora")
NOT_IN_PEFT = ("{variant} adapter saved in lowrank's format: PEFT has no {variant}. Load it "
               "with lowrank.adapters.load_pretrained(model, directory).\n")


# --- save ---------------------------------------------------------------------------------

def save_pretrained(model: Module, directory, base=None) -> Path:
    """Write ``model``'s adapters to ``directory`` as PEFT does (LoRA & co., VeRA, LoHa, LoKr),
    or in lowrank's format for variants PEFT lacks. ``base``: the base model's path (default:
    the checkpoint ``lr.from_pretrained`` read), recorded as ``base_model_name_or_path`` and
    read back for PiSSA/OLoRA/MiLoRA's original weights."""
    directory = Path(directory)
    modules = adapted_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no adapter; inject one first")
    variants = sorted({m.variant for _, m in modules})
    in_peft = {**pf.PEFT_TYPE, **pl.PEFT_TYPE}
    if any(v not in in_peft for v in variants):
        if len(variants) > 1:
            raise ValueError(f"modules mix variants {variants}; PEFT has no "
                             f"{[v for v in variants if v not in in_peft]}")
        adapter_files.save_adapter(model, directory)
        (directory / "README.md").write_text(NOT_IN_PEFT.format(variant=variants[0]))
        return directory
    cfgs = {type(m.config) for _, m in modules}
    cfg = modules[0][1].config
    if len(cfgs) > 1 or any((m.config.dropout, m.config.bias) != (cfg.dropout, cfg.bias)
                            for _, m in modules):
        raise ValueError("PEFT's adapter_config.json holds one variant, dropout and bias; "
                         f"the modules differ ({variants})")
    if cfg.bias != "none":
        raise ValueError(f"bias={cfg.bias!r}: save_pretrained writes PEFT's format with "
                         "bias='none' only; lowrank's own adapter files keep trained biases "
                         "(lowrank.formats.checkpoint.save_adapter)")
    if any(m.merged for _, m in modules):
        raise ValueError("an adapter is merged; unmerge() before save_pretrained")
    layout = pf.layout_of(model)
    source = str(base) if base is not None else _recorded_path(model)
    if cfg.variant in pl.PEFT_TYPE:
        tensors, info = _lycoris_files(model, modules, cfg, layout, source)
    else:
        pieces = _pieces(model, modules, layout, source)
        tensors, info = _peft_files(model, pieces, cfg, layout, source)
    # lowrank's own record rides in the safetensors header: PEFT warns on unknown config fields
    metadata = {"lowrank.version": __version__, "lowrank.variant": cfg.variant,
                "lowrank.config": json.dumps(cfg.to_dict()),
                "lowrank.layout": json.dumps(layout._asdict())}
    directory.mkdir(parents=True, exist_ok=True)
    with StagedFiles() as staged:
        staged.add(directory / WEIGHTS_FILE, safetensors_bytes(tensors, metadata))
        staged.commit(directory / CONFIG_FILE, json_bytes(info))
    return directory


def _recorded_path(model):
    source = getattr(model, "pretrained_from", None) or \
        getattr(getattr(model, "encoder", None), "pretrained_from", None)
    return None if source is None else source.get("path")


def _piece(name, m, original_weight) -> pf.Piece:
    A, B = host_copy(m.lora_A.data), host_copy(m.lora_B.data)
    if m.variant == "adalora":
        rows = m.saved_rows()
        keep = np.flatnonzero(rows)
        return pf.Piece("adalora", A[keep], B[:, keep], m.scaling,
                        E=host_copy(m.lora_E.data)[keep], pattern=tuple(rows))
    init = getattr(m.config, "init", "kaiming")
    if init.startswith(DATA_DRIVEN):
        A, B = pf.data_driven_piece(A, B, m.scaling, original_weight(name),
                                    host_copy(m.weight.data))
    mag = host_copy(m.lora_magnitude_vector.data) if m.variant == "dora" else None
    return pf.Piece(m.variant, A, B, m.scaling, mag=mag)


def _pieces(model, modules, layout, source) -> dict:
    """``{peft module name: Piece}``, q/k/v fused into c_attn."""
    base_model = []

    def original_weight(name):   # PiSSA & co: the base weight before the init rewrote it
        if source is None:
            raise ValueError(f"module {name!r} was initialised with "
                             f"{modules[0][1].config.init!r}, which rewrote its base weight; "
                             "PEFT needs the adapter over the original weight: pass "
                             "base=<the base model's directory>")
        if not base_model:
            base_model.append(pretrained.from_pretrained(source))
        inner = "encoder." if getattr(model, "encoder", None) is not None and \
            getattr(base_model[0], "encoder", None) is None else ""
        linear = dict(base_model[0].named_modules()).get(name[len(inner):] if
                                                         name.startswith(inner) else name)
        if not isinstance(linear, Linear):
            raise ValueError(f"base {source}: no Linear {name!r} to re-express the adapter over")
        return host_copy(linear.weight.data)

    grouped: dict = {}
    for name, m in modules:
        mapped = layout.peft_name(name)
        if mapped is None:
            raise ValueError(f"adapted module {name!r} has no counterpart in the "
                             f"{layout.kind} model PEFT wraps")
        grouped.setdefault(mapped[0], {})[mapped[1]] = _piece(name, m, original_weight)
    linears = dict(model.named_modules())
    out = {}
    for peft_name, parts in grouped.items():
        if None in parts:
            out[peft_name] = parts[None]
            continue
        names = {p: n for n, p in pf.peft_names(layout, linears)[peft_name]}

        def norms(j, names=names):
            W = host_copy(linears[names[j]].weight.data).astype(np.float64)
            return np.sqrt((W * W).sum(axis=1)).astype(W.dtype)
        first = next(iter(parts.values()))
        out[peft_name] = pf.fuse(parts, first.B.shape[0], norms)
    return out


def _lycoris_files(model, modules, cfg, layout, source) -> tuple[dict, dict]:
    """VeRA, LoHa, LoKr (docs/peft.md#vera-loha-lokr): parameters under PEFT's names."""
    pl.check_layers(modules, layout.peft_name, layout.kind)
    layers = [(layout.peft_name(name)[0], m) for name, m in modules]
    saving, to_save, task, fan_in_fan_out = _wrapping(model, layout)
    every = [n for n, m in model.named_modules() if isinstance(m, (Linear, AdaptedLinear))]
    info = pl.config(layers, cfg, list(pf.peft_names(layout, every)), to_save or None, task,
                     source, fan_in_fan_out)
    tensors = pl.tensors(layers, getattr(cfg, "save_projection", False))
    return {**tensors, **_head_tensors(model, layout, saving)}, info


def _wrapping(model, layout) -> tuple:
    """``(modules_to_save, their PEFT names, task_type, fan_in_fan_out)``."""
    saving = _modules_to_save(model)
    to_save = [layout.peft_name(n)[0] for n in saving]
    task = "SEQ_CLS" if to_save else "CAUSAL_LM" if layout.kind == "gpt2" else \
        getattr(model, "peft_task_type", None)   # a model may say what it is (Llama)
    return saving, to_save, task, layout.kind == "gpt2"


def _head_tensors(model, layout, saving) -> dict:
    modules = dict(model.named_modules())
    return {f"{pf.PEFT_PREFIX}{layout.peft_name(name)[0]}.{pname}": p.data
            for name in saving for pname, p in modules[name].named_parameters()}


def _peft_files(model, pieces, cfg, layout, source) -> tuple[dict, dict]:
    saving, to_save, task, fan_in_fan_out = _wrapping(model, layout)
    if cfg.variant == "adalora":
        init_r = max(len(p.pattern) for p in pieces.values())
        patterns = {n: p.pattern + (False,) * (init_r - len(p.pattern))
                    for n, p in pieces.items()}
        scale = cfg.alpha / (init_r + pf.RANKNUM_EPS)
        info = pf.adalora_config(init_r, patterns, cfg, to_save or None, task, source,
                                 fan_in_fan_out)
    else:
        scale = None
        info = pf.lora_config(pieces, cfg, to_save or None, task, source, fan_in_fan_out)
    every = [n for n, m in model.named_modules() if isinstance(m, (Linear, AdaptedLinear))]
    info["target_modules"] = pf.short_targets(list(pieces), list(pf.peft_names(layout, every)))
    tensors = {}
    for name, piece in pieces.items():
        tensors.update(pf.peft_tensors(piece, name, scale))
    tensors.update(_head_tensors(model, layout, saving))
    return tensors, info


def _modules_to_save(model) -> list:
    """Names of the top-most modules that are not adapters, hold no adapter and train whole
    (a classifier head: PEFT's ``modules_to_save``)."""
    adapted = [n for n, _ in adapted_modules(model)]
    out = []
    for name, m in model.named_modules():
        params = list(m.named_parameters())
        if not name or isinstance(m, AdaptedLinear) or not params \
                or any(name.startswith(o + ".") for o in out) \
                or any(a == name or a.startswith(name + ".") for a in adapted):
            continue
        if all(p.trainable for _, p in params):
            out.append(name)
    return out


def is_peft_dir(directory) -> bool:
    """Whether ``directory`` holds a PEFT adapter config (``peft_type``), PEFT's or ours."""
    path = Path(directory) / CONFIG_FILE
    return path.is_file() and "peft_type" in read_json(path)


# --- load ---------------------------------------------------------------------------------

def load_pretrained(model: Module, directory, seed: int = 0, adapter_name: str | None = None):
    """Inject and load the adapter saved in ``directory`` (PEFT's format or lowrank's) into
    ``model``; returns ``model``. A model that holds adapters already takes it only under a
    new ``adapter_name`` (the others stay for ``set_adapter``, docs/peft.md#api)."""
    directory = Path(directory)
    if not adapted_modules(model):
        _load(model, directory, seed)
        if adapter_name is not None:
            model.active_adapter = adapter_name
        return model
    if adapter_name is None or adapter_name in adapter_names(model):
        raise ValueError(f"the model already holds adapters {adapter_names(model)}; load "
                         f"{directory} under a new adapter_name, into a fresh base, or after "
                         "merge_and_unload")
    previous = vars(model).get("active_adapter", "default")
    stash_active(model)
    try:
        _load(model, directory, seed)
    except BaseException:
        set_adapter(model, previous)
        raise
    model.active_adapter = adapter_name
    model.adapter_sets[adapter_name] = dict(adapted_modules(model))
    return model


def _load(model, directory: Path, seed: int) -> None:
    if not (directory / CONFIG_FILE).is_file():
        raise ValueError(f"{directory} is not an adapter directory: it has no {CONFIG_FILE}")
    info = read_json(directory / CONFIG_FILE)
    if info.get("format") == adapter_files.ADAPTER_FORMAT:
        _load_lowrank(model, directory, info, seed)
        return
    kind = info.get("peft_type")
    if kind is None:
        raise ValueError(f"{directory / CONFIG_FILE} is neither a PEFT adapter config (no "
                         f"'peft_type') nor lowrank's (no 'format': "
                         f"{adapter_files.ADAPTER_FORMAT!r})")
    if kind not in ("LORA", "ADALORA") and kind not in pl.VARIANT:
        raise ValueError(f"{directory} holds a PEFT {kind} adapter; lowrank reads LORA (lora, "
                         "rsLoRA, DoRA), ADALORA, VERA, LOHA and LOKR adapters")
    pl.check_config(info, f"{directory / CONFIG_FILE}")
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{directory} holds a PEFT {kind} config but no {WEIGHTS_FILE}")
    _load_peft(model, read_safetensors(path), info, f"{path}", seed)


def _load_peft(model, tensors, info, where, seed):
    lycoris = info["peft_type"] in pl.VARIANT
    by_module, others, shared = pl.split_keys(tensors, info["peft_type"]) if lycoris else \
        ({}, tensors, {})
    bad = [k for k in others if not k.startswith(pf.PEFT_PREFIX)]
    if bad:
        raise ValueError(f"{where}: key {bad[0]!r} lacks PEFT's prefix {pf.PEFT_PREFIX!r}")
    others = {k[len(pf.PEFT_PREFIX):]: a for k, a in others.items()}
    for key in [k for k in others if not lycoris and ".lora_" in k]:
        head, _, tail = key.partition(".lora_")
        by_module.setdefault(head, {})["lora_" + tail] = others.pop(key)
    linears = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    params = dict(model.named_parameters())
    layout, names = _layout_for(model, linears, params, set(by_module), set(others), where,
                                info)
    new, expected, host, metas = {}, {}, {}, {}
    mods = dict(model.named_modules())
    for i, (peft_name, found) in enumerate(sorted(by_module.items())):
        split = [(names[peft_name][0][0], *pl.module_config(peft_name, found, info,
                                                             names[peft_name], where), {})] \
            if lycoris else pf.split_module(peft_name, dict(found), info, names[peft_name], where)
        for name, variant, fields, arrays, extra in split:
            linear = mods[name]
            if fields["r"] > min(linear.weight.shape) and variant != "adalora":
                raise ValueError(f"{where}: module {peft_name!r} has rank {fields['r']}, more "
                                 f"than {name!r} {tuple(linear.weight.shape)} allows")
            bias = None if linear.bias is None else linear.bias.data
            layer = AdaptedLinear(linear.weight.data, bias, config(variant, **fields),
                                  seed=seed + SEED_STRIDE * len(new))
            new[name], metas[name] = layer, extra
            for pname, p in layer.named_parameters():
                if pname in arrays or (lycoris and pname in pl.PARAMS[info["peft_type"]]):
                    expected[f"{name}.{pname}"] = p
            host.update({f"{name}.{pname}": a for pname, a in arrays.items()})
    if info["peft_type"] == "VERA":
        pl.tie_vera(list(new.values()), shared, where)
    for key, array in others.items():   # modules_to_save (a head) or trained biases
        name = _param_name(layout, key, params)
        expected[name], host[name] = params[name], array
    check_and_assign(expected, host, where, strict=True)   # all or nothing
    _attach(model, new, metas, [n for n in host if n in params])


def _param_name(layout, key, params):
    for name in params:
        module, _, pname = name.rpartition(".")
        mapped = layout.peft_name(module)
        if mapped is not None and mapped[1] is None and f"{mapped[0]}.{pname}" == key:
            return name
    raise ValueError(f"key {pf.PEFT_PREFIX}{key!r}: the model has no such parameter")


def _layout_for(model, linears, params, modules, others, where, info):
    """The first candidate layout under which the file names only Linears the model has."""
    for layout in pf.candidate_layouts(model):
        names = pf.peft_names(layout, linears)
        if modules <= set(names):
            try:
                for key in others:
                    _param_name(layout, key, params)
            except ValueError:
                continue
            return layout, names
    missing = sorted(modules - set(pf.peft_names(pf.layout_of(model), linears)))
    raise ValueError(f"{where}: adapter module {(missing or sorted(modules))[0]!r} is not a "
                     f"Linear of this {type(model).__name__} (the adapter was saved for "
                     f"another base: {info.get('base_model_name_or_path')!r})")


def _attach(model, new: dict, metas: dict, trained: list) -> None:
    model.freeze()
    for name, layer in new.items():
        _set_child(model, name, layer)
        if metas[name].get("rank_pattern") is not None:
            layer.rank_pattern = metas[name]["rank_pattern"]
    params = dict(model.named_parameters())
    for name in trained:   # PEFT's modules_to_save train on
        params[name].trainable = True
    for layer in new.values():
        if layer.config.bias == "all":
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.trainable = True


def _load_lowrank(model, directory, info, seed):
    """lowrank's own directory: the saved configs and module names, loaded into new layers
    first (adapter_files checks every key), attached only then."""
    saved = info.get("modules") or {}
    mods = dict(model.named_modules())
    staging = _Staging()
    for i, (name, meta) in enumerate(saved.items()):
        linear = mods.get(name)
        if not isinstance(linear, Linear):
            raise ValueError(f"{directory}: adapter module {name!r} is not a Linear of this "
                             f"{type(model).__name__}")
        bias = None if linear.bias is None else linear.bias.data
        staging.layers[name] = AdaptedLinear(linear.weight.data, bias,
                                             config_from_dict(meta["config"]),
                                             seed=seed + SEED_STRIDE * i)
    adapter_files.load_adapter(staging, directory)
    _attach(model, staging.layers, dict.fromkeys(staging.layers, {}), [])


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


__all__ = ["save_pretrained", "load_pretrained"]
