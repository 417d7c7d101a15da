"""PEFT's VERA, LOHA and LOKR adapter formats <-> lowrank's vera, loha and lokr layers: tensors
and config fields (docs/peft.md#vera-loha-lokr); ``check_config`` holds the PEFT options
lowrank refuses for every type it reads. ``peft_files`` writes and reads the files and keeps
the load all-or-nothing.

lowrank's parameter names are PEFT's (``vera_lambda_b``, ``hada_w1_a``, ``lokr_w2_b`` ...), so
a module's tensors are ``base_model.model.<module>.<parameter>`` as they are. VeRA's shared
frozen pair is saved once, whole, as ``base_model.vera_A`` (r, n_max) and
``base_model.vera_B`` (m_max, r) when ``save_projection`` (PEFT's default); without it the
file holds the λ's only and the pair is redrawn from ``projection_prng_key`` at load, over
the largest adapted shape, as PEFT does.

GPT-2's fused ``c_attn`` has no exact counterpart: LoHa's Hadamard product and LoKr's
Kronecker product of the fused (3m, n) weight are not three independent row blocks, and
VeRA's q, k, v layers each use the first m rows of B where the fused layer uses 3m. A q/k/v
adapter is refused with a ValueError; VeRA's other GPT-2 Linears (``c_proj``, ``c_fc``) save.
PEFT's LoHa and LoKr do not wrap GPT-2's Conv1D layers at all (a TypeError in PEFT), so a
GPT-2 LoHa/LoKr adapter is refused whole.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .. import backend
from .peft_names import PEFT_PREFIX, pattern_value, short_targets

PEFT_TYPE = {"vera": "VERA", "loha": "LOHA", "lokr": "LOKR"}
VARIANT = {v: k for k, v in PEFT_TYPE.items()}
PARAMS = {"VERA": ("vera_lambda_b", "vera_lambda_d"),
          "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
          "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
SHARED_KEYS = {"base_model.vera_A": 0, "base_model.vera_B": 1}   # -> index in the shared pair
# PEFT fields lowrank does not implement, and the value it reads (anything else is refused)
UNSUPPORTED = {"layers_to_transform": None, "bias": "none", "layers_pattern": None,
               "exclude_modules": None, "layer_replication": None,
               "trainable_token_indices": None}
UNSUPPORTED_BY_TYPE = {
    "LORA": {"use_qalora": False, "lora_bias": False, "target_parameters": None},
    "ADALORA": {"use_qalora": False, "lora_bias": False, "target_parameters": None},
    "VERA": {},
    "LOHA": {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False},
    "LOKR": {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
             "rank_dropout_scale": False}}


# --- save ---------------------------------------------------------------------------------

def check_layers(layers: list, peft_name, kind: str) -> None:
    """``layers``: ``[(lowrank name, layer)]``, ``peft_name``: ``Layout.peft_name`` of the
    ``kind`` of model PEFT wraps; refuse what PEFT's format cannot hold."""
    variant = layers[0][1].variant
    if kind == "gpt2" and variant != "vera":
        raise ValueError(f"{variant} adapter on GPT-2: PEFT's {PEFT_TYPE[variant]} does not wrap "
                         "GPT-2's Conv1D layers (it takes Linear, Conv1d and Conv2d only); save "
                         "in lowrank's format (lowrank.formats.checkpoint.save_adapter)")
    for name, layer in layers:
        mapped = peft_name(name)
        if mapped is None:
            raise ValueError(f"adapted module {name!r} has no counterpart in the {kind} model "
                             "PEFT wraps")
        if mapped[1] is not None:
            raise ValueError(f"{layer.variant} adapter on {name!r}: GPT-2's fused c_attn has no "
                             f"exact {PEFT_TYPE[layer.variant]} counterpart for q/k/v adapters "
                             "(docs/peft.md#vera-loha-lokr); target attn.o, mlp.fc1, mlp.fc2, "
                             "or save in lowrank's format (lowrank.formats.checkpoint.save_adapter)")
    first = layers[0][1]
    if first.variant == "vera":
        shared = {id(layer.shared_projections()[0]) for _, layer in layers}
        if len(shared) > 1 or any(layer.config.r != first.config.r for _, layer in layers):
            raise ValueError("VeRA layers of one PEFT adapter share one projection pair of one "
                             "rank; these layers hold several (inject them in one call)")


def tensors(layers: list, save_projection: bool) -> dict:
    """``{PEFT key: host array}``; ``layers``: ``[(PEFT module name, layer)]``."""
    out = {}
    for peft_name, layer in layers:
        for pname, p in layer.named_parameters():
            out[f"{PEFT_PREFIX}{peft_name}.{pname}"] = p.data
    if layers[0][1].variant == "vera" and save_projection:
        A, B = layers[0][1].shared_projections()
        out["base_model.vera_A"], out["base_model.vera_B"] = A, B   # (r, n_max), (m_max, r)
    return out


def config(layers: list, cfg, every: list, modules_to_save, task_type, base,
           fan_in_fan_out) -> dict:
    """PEFT's VeraConfig / LoHaConfig / LoKrConfig fields; ``layers``: ``[(PEFT name, layer)]``,
    ``every``: the PEFT names of every Linear (for ``target_modules``)."""
    common = {"peft_type": PEFT_TYPE[cfg.variant], "bias": "none",
              "target_modules": short_targets([n for n, _ in layers], every),
              "modules_to_save": modules_to_save, "task_type": task_type,
              "base_model_name_or_path": base, "inference_mode": True, "revision": None,
              "layers_to_transform": None, "layers_pattern": None}
    if cfg.variant == "vera":
        return {**common, "r": cfg.r, "d_initial": cfg.d_initial,
                "projection_prng_key": cfg.projection_prng_key,
                "save_projection": cfg.save_projection, "vera_dropout": cfg.dropout,
                "fan_in_fan_out": fan_in_fan_out, "init_weights": True}
    ranks = {n: layer.config.r for n, layer in layers}
    alphas = {n: layer.config.alpha for n, layer in layers}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    out = {**common, "r": r, "alpha": alpha,
           "rank_pattern": {n: k for n, k in ranks.items() if k != r},
           "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
           "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
           "init_weights": True, "exclude_modules": None}
    if cfg.variant == "lokr":
        out.update(decompose_both=cfg.decompose_both, decompose_factor=cfg.decompose_factor,
                   rank_dropout_scale=False, init_weights=cfg.init_weights)
    return out


# --- load ---------------------------------------------------------------------------------

def check_config(info: dict, where: str) -> None:
    """Refuse PEFT options lowrank does not implement (any PEFT type lowrank reads)."""
    for field, value in {**UNSUPPORTED, **UNSUPPORTED_BY_TYPE[info["peft_type"]]}.items():
        if info.get(field, value) not in (value, [], {}):
            raise ValueError(f"{where}: PEFT field {field!r} = {info[field]!r} is not supported "
                             f"(lowrank reads {value!r})")


def split_keys(keys: dict, peft_type: str) -> tuple[dict, dict, dict]:
    """``(by module {name: {param: array}}, others {key: array}, shared {index: array})``;
    ``keys`` are full PEFT keys."""
    by_module, others, shared = {}, {}, {}
    suffixes = PARAMS[peft_type]
    for key, array in keys.items():
        if key in SHARED_KEYS and peft_type == "VERA":
            shared[SHARED_KEYS[key]] = array
            continue
        head, _, tail = key.rpartition(".")
        if tail in suffixes and key.startswith(PEFT_PREFIX):
            by_module.setdefault(head[len(PEFT_PREFIX):], {})[tail] = array
        else:
            others[key] = array
    return by_module, others, shared


def module_config(peft_name: str, found: dict, info: dict, parts: list, where: str) -> tuple:
    """``(variant, config fields, {param: array})`` of one PEFT module; ``parts`` as in
    ``peft_format.split_module`` (a fused c_attn is refused)."""
    kind = info["peft_type"]
    if len(parts) > 1 or parts[0][1] is not None:
        raise ValueError(f"{where}: module {peft_name!r}: a {kind} adapter on GPT-2's fused "
                         "c_attn cannot be split into q, k, v (docs/peft.md#vera-loha-lokr)")
    fields = {"bias": "none"}
    if kind == "VERA":
        fields.update(r=int(info.get("r", 8)), d_initial=float(info.get("d_initial", 0.1)),
                      projection_prng_key=int(info.get("projection_prng_key", 0)),
                      save_projection=bool(info.get("save_projection", True)),
                      dropout=float(info.get("vera_dropout") or 0.0))
    else:
        fields.update(r=int(pattern_value(info.get("rank_pattern"), peft_name, info.get("r", 8))),
                      alpha=float(pattern_value(info.get("alpha_pattern"), peft_name,
                                                info.get("alpha", 8))))
    if kind == "LOKR":
        init = info.get("init_weights", True)
        fields.update(decompose_both=bool(info.get("decompose_both", False)),
                      decompose_factor=int(info.get("decompose_factor", -1)),
                      init_weights="lycoris" if init == "lycoris" else True)
    if kind != "LOKR":
        missing = [p for p in PARAMS[kind] if p not in found]
        if missing:
            raise ValueError(f"{where}: module {peft_name!r} has no {missing[0]!r} tensor (the "
                             "file is incomplete)")
    return VARIANT[kind], fields, dict(found)


def shared_pair(shared: dict, r: int, shapes: list, where: str):
    """VeRA's saved ``(A (r, n_max), B (m_max, r))``, checked against the layers' ``shapes``
    (m, n); None when the file has none (save_projection=False)."""
    if not shared:
        return None
    if len(shared) != 2:
        raise ValueError(f"{where}: VERA file holds one of base_model.vera_A / vera_B only "
                         "(the file is incomplete)")
    A, B = shared[0], shared[1]
    m_max, n_max = max(m for m, _ in shapes), max(n for _, n in shapes)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r \
            or A.shape[1] < n_max or B.shape[0] < m_max:
        raise ValueError(f"{where}: VERA projections {A.shape}, {B.shape} cannot serve rank {r} "
                         f"layers up to {m_max}x{n_max}")
    return np.asarray(A), np.asarray(B)


def tie_vera(layers, shared, where) -> None:
    """One projection pair for every VeRA layer: the file's, or PEFT's redraw from the key."""
    if not layers:
        return
    shapes = [tuple(layer.weight.shape) for layer in layers]
    pair = shared_pair(shared, layers[0].config.r, shapes, where)
    if pair is None:
        type(layers[0]).after_inject(None, layers)
        return
    first = layers[0]
    A, B = (backend.asarray(a, dtype=first.dtype, xp=first.xp) for a in pair)
    for layer in layers:
        layer.set_projections(A, B)
