"""``save_pretrained`` / ``load_pretrained`` / ``inject_saved``: adapter directories that PEFT
loads, and PEFT's (or lowrank's) directories loaded into a lowrank model (docs/peft.md).

``save_pretrained(model, dir)`` writes PEFT's ``adapter_model.safetensors`` and
``adapter_config.json`` through the variant's ``peft_codec`` (its own file says how its
tensors and fields read in PEFT); q/k/v on GPT-2 are fused here (``peft_format``). Variants
PEFT lacks save in lowrank's own format (``adapter_files``), with no ``peft_type``. Named
adapters save as PEFT does: ``default`` in ``dir``, each other in ``dir/<name>``.

``load_pretrained(model, dir)`` reads either format; ``inject_saved(model, dir or config)``
puts in the adapters a saved config describes, weights at their init. Both check and build
everything in new layers first, so a bad directory raises a one-line ValueError and leaves
the model as it was.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import adapter_dir as adapter_files
from .adapter_dir import ADAPTER_CONFIG_FILE
from .model_dir import open_model
from . import peft_names as pf
from .._version import __version__
from ..adapters import AdaptedLinear, config, peft_codecs, validate_config
from ..adapters._peft import check_tensors
from ..adapters.inject import SEED_STRIDE, adapted_modules, adapter_names, set_adapter, stash_active
from ..nn.layers import Linear
from ..nn.module import Module
from .saved_adapters import (attach, build, inject_saved, lowrank_specs, new_layer,  # noqa: F401
                             read_config)
from ..files.storage import (SAVE_ID_KEY, StagedFiles, atomic_write, check_and_assign, host_copy,
                             json_bytes, read_json, read_safetensors, safetensors_bytes)

WEIGHTS_FILE = adapter_files.ADAPTER_FILE
HEAD_FILE = "classifier.safetensors"   # a mean-pooled classifier's head (docs/peft.md#heads)
NOT_IN_PEFT = ("{variant} adapter saved in lowrank's format: PEFT has no {variant}. Load it "
               "with lowrank.load_pretrained(model, directory).\n")
MEAN_POOLED = """Mean-pooled classifier, saved as PEFT's FEATURE_EXTRACTION adapter over the
encoder: transformers' BertForSequenceClassification reads the [CLS] pooler, which this
classifier never used, so a SEQ_CLS adapter would predict differently. To reproduce its logits:

    enc = PeftModel.from_pretrained(BertModel.from_pretrained(BASE), THIS_DIRECTORY).eval()
    h = enc(input_ids=ids, attention_mask=mask).last_hidden_state        # (B, T, d)
    z = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)          # mean of the tokens
    head = safetensors.torch.load_file(THIS_DIRECTORY + "/classifier.safetensors")
    logits = z @ head["weight"].T + head["bias"]

lowrank: lowrank.load_pretrained(classifier, THIS_DIRECTORY) loads the adapter and the head.
"""


# --- save ---------------------------------------------------------------------------------

def save_pretrained(model: Module, directory, base=None) -> Path:
    """Write ``model``'s adapters to ``directory`` as PEFT does, or in lowrank's format for
    variants PEFT lacks; named adapters as PEFT does (``default`` in ``directory``, each other
    in ``directory/<name>``). ``base``: the base model's path (default: the checkpoint
    ``lr.from_pretrained`` read), recorded as ``base_model_name_or_path`` and read back for
    PiSSA/OLoRA/MiLoRA's original weights."""
    directory = Path(directory)
    if not vars(model).get("adapter_sets"):
        return _save_one(model, directory, base)
    active = vars(model).get("active_adapter", "default")
    try:
        for name in adapter_names(model):
            if name != vars(model).get("active_adapter", "default"):
                set_adapter(model, name)
            _save_one(model, directory if name == "default" else directory / name, base)
    finally:
        if vars(model).get("active_adapter", "default") != active:
            set_adapter(model, active)
    return directory


def _save_one(model, directory: Path, base) -> Path:
    modules = adapted_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no adapter; inject one first")
    variants = sorted({m.variant for _, m in modules})
    codec = type(modules[0][1]).peft_codec
    if len(variants) > 1:
        raise ValueError(f"modules mix variants {variants}; one adapter file holds one")
    if codec is None:
        adapter_files.save_adapter(model, directory)
        (directory / "README.md").write_text(NOT_IN_PEFT.format(variant=variants[0]))
        return directory
    cfg = modules[0][1].config
    if any((m.config.dropout, m.config.bias) != (cfg.dropout, cfg.bias) for _, m in modules):
        raise ValueError("PEFT's adapter_config.json holds one dropout and bias; the modules "
                         "differ")
    if cfg.bias != "none":
        raise ValueError(f"bias={cfg.bias!r}: save_pretrained writes PEFT's format with "
                         "bias='none' only; lowrank's own adapter files keep trained biases "
                         "(lowrank.formats.checkpoint.save_adapter)")
    if any(m.merged for _, m in modules):
        raise ValueError("an adapter is merged; unmerge() before save_pretrained")
    layout, mean_pooled = pf.layout_of(model), getattr(model, "pooling", None) == "mean"
    if mean_pooled:   # the encoder alone is what PEFT wraps (BertModel: no "bert." prefix)
        layout = layout._replace(prefix="")
    if layout.kind == "gpt2" and not codec.wraps_conv1d:
        raise ValueError(f"{cfg.variant} adapter on GPT-2: PEFT's {codec.peft_type} does not "
                         "wrap GPT-2's Conv1D layers (it takes Linear, Conv1d and Conv2d only); "
                         "save in lowrank's format (lowrank.formats.checkpoint.save_adapter)")
    source = str(base) if base is not None else _recorded_path(model)
    items = _items(model, modules, layout, source, codec)
    tensors, fields = codec.save(items, cfg)
    saving = _modules_to_save(model)
    heads = {} if not mean_pooled else {n: p.data for n, p in model.classifier.named_parameters()}
    if mean_pooled:
        saving = [n for n in saving if n != "classifier"]
    to_save = [layout.peft_name(n)[0] for n in saving] or None
    task = "FEATURE_EXTRACTION" if mean_pooled else "SEQ_CLS" if to_save else \
        "CAUSAL_LM" if layout.kind == "gpt2" else \
        getattr(model, "peft_task_type", None)   # a model may say what it is (Llama)
    every = [n for n, m in model.named_modules() if isinstance(m, (Linear, AdaptedLinear))]
    info = {"peft_type": codec.peft_type, **fields,
            "target_modules": pf.short_targets(list(items), list(pf.peft_names(layout, every))),
            "modules_to_save": to_save, "task_type": task, "base_model_name_or_path": source,
            "inference_mode": True, "revision": None, "layers_to_transform": None,
            "layers_pattern": None}
    if "fan_in_fan_out" in codec.fields:
        info["fan_in_fan_out"] = layout.kind == "gpt2"
    modules_by = dict(model.named_modules())
    tensors.update({f"{pf.PEFT_PREFIX}{layout.peft_name(name)[0]}.{pname}": p.data
                    for name in saving for pname, p in modules_by[name].named_parameters()})
    directory.mkdir(parents=True, exist_ok=True)
    with StagedFiles() as staged:   # lowrank's record rides in the header: PEFT warns on
        metadata = {"lowrank.version": __version__, "lowrank.variant": cfg.variant,  # unknown
                    "lowrank.config": json.dumps(cfg.to_dict()),           # config fields
                    "lowrank.layout": json.dumps(layout._asdict()), SAVE_ID_KEY: staged.save_id}
        staged.add(directory / WEIGHTS_FILE, safetensors_bytes(tensors, metadata))
        if heads:
            staged.add(directory / HEAD_FILE,
                       safetensors_bytes(heads, {SAVE_ID_KEY: staged.save_id}))
        staged.commit(directory / ADAPTER_CONFIG_FILE, json_bytes(info),
                      remove=[] if heads else [directory / HEAD_FILE])
    if heads:
        atomic_write(directory / "README.md", MEAN_POOLED.encode())
    return directory


def _recorded_path(model):
    source = getattr(model, "pretrained_from", None) or \
        getattr(getattr(model, "encoder", None), "pretrained_from", None)
    return None if source is None else source.get("path")


def _items(model, modules, layout, source, codec) -> dict:
    """``{PEFT module name: Piece or layer}``; q/k/v fused into GPT-2's c_attn."""
    base_model = []

    def original_weight(name):   # PiSSA & co: the base weight before the init rewrote it
        if source is None:
            raise ValueError(f"module {name!r} was initialised with "
                             f"{modules[0][1].config.init!r}, which rewrote its base weight; "
                             "PEFT needs the adapter over the original weight: pass "
                             "base=<the base model's directory>")
        if not base_model:
            base_model.append(open_model(source, "float32"))
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
        if mapped[1] is not None and not codec.fused:
            raise ValueError(f"{m.variant} adapter on {name!r}: GPT-2's fused c_attn has no "
                             f"exact {codec.peft_type} counterpart for q/k/v adapters "
                             "(docs/peft.md#vera-loha-lokr); target attn.o, mlp.fc1, mlp.fc2, "
                             "or save in lowrank's format (lowrank.formats.checkpoint.save_adapter)")
        grouped.setdefault(mapped[0], {})[mapped[1]] = \
            codec.piece(m, lambda name=name: original_weight(name)) if codec.fused else m
    linears = dict(model.named_modules())
    out = {}
    for peft_name, parts in grouped.items():
        if None in parts:
            out[peft_name] = parts[None]
            continue
        names = {p: n for n, p in pf.peft_names(layout, linears)[peft_name]}

        def norms(j, names=names):
            W = host_copy(linears[names[j]].weight.data).astype("float64")
            return ((W * W).sum(axis=1) ** 0.5).astype(W.dtype)
        first = next(iter(parts.values()))
        out[peft_name] = pf.fuse(parts, first.B.shape[0], norms)
    return out


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
    path = Path(directory) / ADAPTER_CONFIG_FILE
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
    info, where = read_config(directory)
    if info.get("format") == adapter_files.ADAPTER_FORMAT:
        staging = build(model, lowrank_specs(info), seed, where)
        adapter_files.load_adapter(staging, directory)
        attach(model, staging.layers, dict.fromkeys(staging.layers, {}), [])
        return
    codec = validate_config(info, where, peft_codecs())
    if info.get("task_type") == "SEQ_CLS" and getattr(model, "pooling", None) == "mean":
        raise ValueError(f"{where}: a SEQ_CLS adapter's head reads the [CLS] pooler "
                         "(BertForSequenceClassification); this classifier pools the mean of "
                         "the tokens and would predict differently: build it with pooling='cls'")
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{directory} holds a PEFT {codec.peft_type} config but no "
                         f"{WEIGHTS_FILE}")
    tensors, extra = read_safetensors(path), {}
    check_tensors(tensors, path)
    if (directory / HEAD_FILE).is_file() and getattr(model, "pooling", None) == "mean":
        extra = {f"classifier.{k}": a for k, a in read_safetensors(directory / HEAD_FILE).items()}
        check_tensors(extra, directory / HEAD_FILE)
    _load_peft(model, tensors, info, codec, f"{path}", seed, extra)


def _load_peft(model, tensors, info, codec, where, seed, extra):
    shared = {codec.shared_keys[k]: tensors.pop(k) for k in list(tensors)
              if k in codec.shared_keys}
    bad = [k for k in tensors if not k.startswith(pf.PEFT_PREFIX)]
    if bad:
        raise ValueError(f"{where}: key {bad[0]!r} lacks PEFT's prefix {pf.PEFT_PREFIX!r}")
    families = {"." + k.split("_")[0] + "_" for k in codec.module_keys}
    by_module, others = {}, {}
    for key, array in tensors.items():
        rest = key[len(pf.PEFT_PREFIX):]
        suffix = next((s for s in codec.module_keys if rest.endswith("." + s)), None)
        if suffix is not None:
            by_module.setdefault(rest[:-len(suffix) - 1], {})[suffix] = array
        elif any(f in rest for f in families):
            raise ValueError(f"{where}: unexpected key {key!r} (a {codec.peft_type} adapter's "
                             f"modules hold {list(codec.module_keys)})")
        else:
            others[rest] = array
    if not by_module:
        raise ValueError(f"{where}: the file holds no {codec.peft_type} adapter tensor")
    linears = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    params = dict(model.named_parameters())
    layout, names = _layout_for(model, linears, params, set(by_module), set(others), where,
                                info)
    new, expected, host, metas = {}, {}, {}, {}
    mods = dict(model.named_modules())
    for peft_name, found in sorted(by_module.items()):
        for name, variant, fields, arrays, meta in codec.load_module(
                peft_name, dict(found), info, names[peft_name], where):
            here = f"{where}: module {peft_name!r}"   # a rank the Linear cannot hold, ...
            layer = new_layer(mods[name], _config(variant, fields, here),
                              seed + SEED_STRIDE * len(new), here)
            new[name], metas[name] = layer, meta
            for pname, p in layer.named_parameters():
                if pname in arrays or (p.trainable and pname not in ("weight", "bias")):
                    expected[f"{name}.{pname}"] = p
            host.update({f"{name}.{pname}": a for pname, a in arrays.items()})
    codec.after_load(list(new.values()), shared, where)
    for key, array in others.items():   # modules_to_save (a head) or trained biases
        name = _param_name(layout, key, params)
        expected[name], host[name] = params[name], array
    for name, array in extra.items():   # a mean-pooled classifier's head file
        if name not in params:
            raise ValueError(f"{where}: {HEAD_FILE} holds {name!r}, the model has no such "
                             "parameter")
        expected[name], host[name] = params[name], array
    try:
        check_and_assign(expected, host, where, strict=True)   # all or nothing
    except ValueError as exc:   # the config decides an adapter module's shapes and tensors
        if not any(f"'{name}." in str(exc) for name in new):
            raise
        raise ValueError(f"{exc}; the rank fields of {ADAPTER_CONFIG_FILE} (r, rank_pattern, ...) do "
                         "not fit the tensors") from None
    attach(model, new, metas, [n for n in host if n in params])


def _config(variant, fields, where):
    try:
        return config(variant, **fields)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


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


__all__ = ["save_pretrained", "load_pretrained", "inject_saved"]
