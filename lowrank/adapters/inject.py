"""Put adapters into a model: ``inject(model, cfg, targets=["q", "v"])`` (PEFT's target_modules),
and take them out again: ``merge_and_unload``, ``disable_adapter``, named adapters with
``add_adapter``/``set_adapter``, and PEFT's parameter summary (docs/peft.md#api).

``targets`` is a list of name suffixes (``"q"`` matches ``blocks.0.attn.q``; ``"attn.q"`` works
too) or a single regex string that must match the whole module name, as in PEFT, or PEFT's
``"all-linear"`` (every Linear but the output head). Every matching
``Linear`` is replaced by an ``AdaptedLinear`` over its weight; the rest of the model is frozen,
so only adapter parameters (and biases, with ``bias="all"``) train.
"""
from __future__ import annotations

import contextlib
import re

from ..nn.layers import Linear
from ..nn.validate import check_seed
from .base import AdaptedLinear, AdapterConfig, config

# PEFT's shorthand for every Linear but the output head (its output embedding, or a
# classification head's usual names); the heads are top-level modules
ALL_LINEAR = "all-linear"
OUTPUT_HEADS = ("lm_head", "classifier", "score")
SEED_STRIDE = 7919   # layer i of an injection gets seed + SEED_STRIDE·i (reproducible per layer)


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(model, targets, who: str = "") -> list:
    """``[(name, Linear)]`` of ``model`` matching ``targets``; a target that matches nothing
    raises ValueError listing the Linear modules that exist (``who`` prefixes the message)."""
    if not targets:
        raise ValueError(f"{who}targets must name at least one module")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = [name for name, _ in linears if name not in OUTPUT_HEADS]
    chosen = [(name, m) for name, m in linears if _matches(name, targets)]
    unmatched = [] if isinstance(targets, str) else \
        [t for t in targets if not any(_matches(name, [t]) for name, _ in linears)]
    if not chosen or unmatched:
        raise ValueError(f"{who}targets {unmatched or targets!r} match no Linear module; "
                         f"Linear modules: {[name for name, _ in linears]}")
    return chosen


def _set_child(model, name: str, child) -> None:
    *path, last = name.split(".")
    parent = model
    for part in path:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    if last.isdigit():
        parent[int(last)] = child
    else:
        setattr(parent, last, child)


def inject(model, cfg: AdapterConfig, targets, seed: int = 0) -> list[str]:
    """Wrap the matching Linears of ``model`` in adapters; returns the adapted module names."""
    if not isinstance(cfg, AdapterConfig):
        raise ValueError(f"cfg must be an adapter config, got {type(cfg).__name__}")
    check_seed(seed)
    chosen = select_targets(model, targets)
    model.freeze()
    names = []
    for i, (name, linear) in enumerate(chosen):
        bias = None if linear.bias is None else linear.bias.data
        _set_child(model, name, AdaptedLinear(linear.weight.data, bias, cfg,
                                              seed=seed + SEED_STRIDE * i))
        names.append(name)
    layers = [m for name, m in adapted_modules(model) if name in names]
    type(layers[0]).after_inject(model, layers)   # what the layers share (VeRA's projections)
    if cfg.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.trainable = True
    return names


def adapted_modules(model) -> list[tuple[str, AdaptedLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def merge_all(model) -> None:
    for _, module in adapted_modules(model):
        module.merge()


# --- PEFT's model-level API (docs/peft.md#api) ------------------------------------------------

def _plain(layer: AdaptedLinear, weight) -> Linear:
    """A frozen ``Linear`` of ``weight`` and the layer's bias (its trained value, if any)."""
    bias = None if layer.bias is None else layer.bias.data
    linear = Linear.from_arrays(weight, bias)
    linear.freeze()
    return linear


def merge_and_unload(model):
    """Fold every adapter into its weight and put plain ``Linear`` modules back (PEFT's
    ``merge_and_unload``): the model is then a base model again, which ``lr.save`` writes and
    ``lr.load`` reads, with the merged outputs. Returns ``model``."""
    for name, layer in adapted_modules(model):
        if not layer.merged:
            layer.merge()
        _set_child(model, name, _plain(layer, layer.weight.data))
    vars(model).pop("adapter_sets", None)
    vars(model).pop("active_adapter", None)
    return model


def _base_weight(layer: AdaptedLinear):
    return layer.unmerged_weight() if layer.merged else layer.weight.data


@contextlib.contextmanager
def disable_adapter(model):
    """``with disable_adapter(model):`` the model runs its base (each layer's frozen weight,
    as PEFT's ``disable_adapter``: for PiSSA & co that is the residual base)."""
    layers = adapted_modules(model)
    for name, layer in layers:
        _set_child(model, name, _plain(layer, _base_weight(layer)))
    try:
        yield model
    finally:
        for name, layer in layers:
            _set_child(model, name, layer)


def _unload_active(model) -> dict:
    """Take the active adapters out (plain Linears over their base) and return them."""
    layers = dict(adapted_modules(model))
    for name, layer in layers.items():
        if getattr(layer.config, "init", "kaiming") in ("pissa", "olora", "milora") \
                or str(getattr(layer.config, "init", "")).startswith("pissa_niter"):
            raise ValueError(f"adapter {name!r} rewrote its base weight ({layer.config.init}); "
                             "it cannot share the base with other named adapters")
        _set_child(model, name, _plain(layer, _base_weight(layer)))
    return layers


def stash_active(model) -> None:
    """Keep the active adapters under their name (``"default"`` for ones ``inject`` put in)
    and unload them, so another adapter can be injected over the same base."""
    sets = vars(model).setdefault("adapter_sets", {})
    active = vars(model).get("active_adapter", "default")
    if adapted_modules(model):
        sets[active] = _unload_active(model)


def add_adapter(model, adapter_name: str, cfg: AdapterConfig, targets, seed: int = 0):
    """Inject a further adapter under ``adapter_name`` and make it the active one (the others
    stay, unloaded, for ``set_adapter``); returns the adapted module names."""
    if adapter_name in vars(model).get("adapter_sets", {}):
        raise ValueError(f"an adapter named {adapter_name!r} exists; adapters: "
                         f"{adapter_names(model)}")
    stash_active(model)
    names = inject(model, cfg, targets, seed=seed)
    model.active_adapter = adapter_name
    model.adapter_sets[adapter_name] = dict(adapted_modules(model))
    return names


def adapter_names(model) -> list[str]:
    sets = vars(model).get("adapter_sets", {})
    active = vars(model).get("active_adapter", "default" if adapted_modules(model) else None)
    return sorted(set(sets) | ({active} if active else set()))


def set_adapter(model, adapter_name: str) -> None:
    """Make the named adapter the active one (PEFT's ``set_adapter``): one adapter runs at a
    time; ``lowrank.multi`` runs many in one batch."""
    sets = vars(model).get("adapter_sets", {})
    if adapter_name not in sets:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters: {adapter_names(model)}")
    stash_active(model)
    for name, layer in sets[adapter_name].items():
        _set_child(model, name, layer)
    model.active_adapter = adapter_name


def trainable_summary(model) -> str:
    """PEFT's ``print_trainable_parameters`` line for ``model``."""
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


ADALORA_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                  "orth_reg_weight", "total_step")


def config_from_peft(peft_config: dict) -> tuple[AdapterConfig, list]:
    """``(cfg, targets)`` from a PEFT ``adapter_config.json`` dict (LORA, with use_rslora /
    use_dora, or ADALORA): ``inject(model, cfg, targets)`` then builds PEFT's adapter."""
    kind = peft_config.get("peft_type")
    if kind not in ("LORA", "ADALORA"):
        raise ValueError(f"peft_type {kind!r}: lowrank maps LORA and ADALORA configs")
    fields = {k: peft_config[k] for k in ("r", "lora_alpha", "lora_dropout", "bias")
              if peft_config.get(k) is not None}
    if kind == "ADALORA":
        fields.update({k: peft_config[k] for k in ADALORA_FIELDS
                       if peft_config.get(k) is not None})
        fields["r"] = fields.pop("init_r", fields.get("r", 12))
        cfg = config("adalora", **fields)
    else:
        cfg = config("lora", use_rslora=bool(peft_config.get("use_rslora")),
                     use_dora=bool(peft_config.get("use_dora")), **fields)
    targets = peft_config.get("target_modules") or []
    return cfg, [targets] if isinstance(targets, str) else list(targets)
