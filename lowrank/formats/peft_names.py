"""PEFT's adapter format <-> lowrank's adapter layers: module names, tensors and config fields
(docs/peft.md). Host-side numpy only; the files and the all-or-nothing load are in
``peft_files``.

Names (docs/peft.md#names): a model read from a Hugging Face checkpoint keeps the names PEFT
sees in the transformers model: BERT's are the checkpoint's (``bert.`` under a classifier head),
GPT-2's ``blocks.i.attn.{q,k,v}`` are rows of the fused ``transformer.h.i.attn.c_attn``
(``o``, ``fc1``, ``fc2`` are ``c_proj``, ``c_fc``, ``c_proj``). lowrank's own GPT keeps its own
names (the torch twin in reference/ has them too).

The fused ``c_attn`` (docs/peft.md#c-attn): q, k, v adapters save as one adapter of rank
Σ r_j with ``A`` stacked and ``B`` block-diagonal — ``ΔW = s·blockdiag(B_j)·[A_j]`` has exactly
the rows ``s·B_j A_j`` — and a ``c_attn`` adapter loads as q, k, v adapters sharing ``A`` (and
AdaLoRA's ``E``) with ``B``'s row blocks: both ways exact, as DoRA's magnitude is per row too.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import NamedTuple

import numpy as np

PEFT_PREFIX = "base_model.model."
PEFT_TYPE = {"lora": "LORA", "dora": "LORA", "adalora": "ADALORA"}
RANKNUM_EPS = 1e-5                      # PEFT's AdaLoRA scaling α / (ranknum + 1e-5)
# lowrank block-relative name -> (GPT-2 module, part of the fused c_attn or None)
GPT2_NAMES = {"attn.q": ("attn.c_attn", 0), "attn.k": ("attn.c_attn", 1),
              "attn.v": ("attn.c_attn", 2), "attn.o": ("attn.c_proj", None),
              "mlp.fc1": ("mlp.c_fc", None), "mlp.fc2": ("mlp.c_proj", None)}
FUSED_PARTS = 3
# tensor names: PEFT's key suffix per lowrank parameter, by PEFT type
LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
             "lora_magnitude_vector": "lora_magnitude_vector"}
ADALORA_KEYS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}


class Layout(NamedTuple):
    """How lowrank module names read in the transformers model PEFT wraps."""

    kind: str      # "lowrank" (names as they are), "gpt2", "bert"
    prefix: str    # the transformers task model's prefix: "transformer.", "bert." or ""
    inner: str     # the lowrank prefix of the wrapped encoder ("encoder." under a head) or ""

    def peft_name(self, name: str):
        """``(module name in the transformers model, part of a fused c_attn or None)``, or
        None when the module has no counterpart there."""
        if self.inner:
            if not name.startswith(self.inner):
                return name, None                  # a head beside the encoder: "classifier"
            name = name[len(self.inner):]
        if self.kind != "gpt2":
            return self.prefix + name, None
        m = re.fullmatch(r"blocks\.(\d+)\.(attn\.[qkvo]|mlp\.fc[12])", name)
        if m is None:
            return None
        module, part = GPT2_NAMES[m.group(2)]
        return f"{self.prefix}h.{m.group(1)}.{module}", part


def layout_of(model) -> Layout:
    """The layout a save writes: from the checkpoint ``lr.from_pretrained`` recorded on the
    model (or on its ``encoder`` under a classifier head); lowrank's own names otherwise."""
    source, inner = getattr(model, "pretrained_from", None), ""
    encoder = getattr(model, "encoder", None)
    if source is None and getattr(encoder, "pretrained_from", None) is not None:
        source, inner = encoder.pretrained_from, "encoder."
    kind = (source or {}).get("model_type")
    if kind == "gpt2":
        return Layout("gpt2", "transformer.", inner)
    if kind == "bert":
        return Layout("bert", "bert." if inner else "", inner)
    return Layout("lowrank", "", "")


def candidate_layouts(model) -> list[Layout]:
    """Every layout a PEFT file for this model may use (the first that names only modules the
    model has is the file's)."""
    inners = [""] + (["encoder."] if getattr(model, "encoder", None) is not None else [])
    out = [Layout("lowrank", "", "")]
    for inner in inners:
        out += [Layout("bert", p, inner) for p in ("", "bert.")]
        out += [Layout("gpt2", p, inner) for p in ("transformer.", "")]
    return out


def peft_names(layout: Layout, names) -> dict:
    """``{peft module name: [(lowrank name, part)]}`` for the lowrank module ``names``."""
    out: dict = {}
    for name in names:
        mapped = layout.peft_name(name)
        if mapped is not None:
            out.setdefault(mapped[0], []).append((name, mapped[1]))
    return out


# --- lowrank layer -> PEFT tensors --------------------------------------------------------------

class Piece(NamedTuple):
    """One lowrank layer in PEFT's terms (host float arrays)."""

    kind: str          # "lora", "dora", "adalora"
    A: np.ndarray      # (r, n) (AdaLoRA: the saved triplets only)
    B: np.ndarray      # (m, r)
    scale: float       # s (AdaLoRA: c = α / (init_r + 1e-5))
    E: object = None   # (r,) AdaLoRA
    mag: object = None  # (m,) DoRA
    pattern: tuple = ()  # AdaLoRA: which of the init_r triplets are saved


def fuse(pieces: dict, part_rows: int, base_norms) -> Piece:
    """The c_attn piece of q, k, v pieces ``{part: Piece}``: A (and E) stacked, B
    block-diagonal; a part without adapter adds no rank (DoRA: its magnitude is its base's row
    norms ``base_norms(part)``, so its rows are unchanged)."""
    first = next(iter(pieces.values()))
    if any(p.kind != first.kind or p.scale != first.scale for p in pieces.values()):
        raise ValueError("q, k, v adapters of one c_attn differ in variant or scaling; PEFT's "
                         "c_attn adapter has one")
    parts = sorted(pieces)
    A = np.concatenate([pieces[j].A for j in parts])                        # (Σr, n)
    B = np.zeros((FUSED_PARTS * part_rows, A.shape[0]), dtype=first.B.dtype)  # (3m, Σr)
    col, mags, pattern = 0, [], []
    for j in range(FUSED_PARTS):
        p = pieces.get(j)
        rows = slice(j * part_rows, (j + 1) * part_rows)
        if p is None:
            mags.append(base_norms(j) if first.kind == "dora" else None)
            if first.kind == "adalora":
                pattern += [False] * len(first.pattern)
            continue
        B[rows, col:col + p.A.shape[0]] = p.B
        col += p.A.shape[0]
        mags.append(p.mag)
        pattern += list(p.pattern)
    E = np.concatenate([pieces[j].E for j in parts]) if first.kind == "adalora" else None
    mag = np.concatenate(mags) if first.kind == "dora" else None
    return Piece(first.kind, A, B, first.scale, E, mag, tuple(pattern))


def data_driven_piece(A, B, s: float, W0, W_base) -> tuple:
    """A PiSSA/OLoRA/MiLoRA LoRA over the original ``W0`` (docs/peft.md#pissa): the layer
    holds ``W_base = W0 - s·B0A0`` and ``(A', B')``, so ``ΔW = s(B'A' - B0A0)`` is the rank-2r
    LoRA ``[A'; A0]``, ``[B', -B0]``; ``B0A0 = (W0 - W_base)/s`` has rank r, and its top-r
    SVD gives the factors (float64 on the host)."""
    r = A.shape[0]
    D = (np.asarray(W0, np.float64) - np.asarray(W_base, np.float64)) / s       # (m, n)
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    root = np.sqrt(S[:r])
    B0, A0 = U[:, :r] * root, root[:, None] * Vt[:r]                            # (m, r), (r, n)
    return (np.concatenate([A, A0.astype(A.dtype)]),                            # (2r, n)
            np.concatenate([B, -B0.astype(B.dtype)], axis=1))                   # (m, 2r)


def peft_tensors(piece: Piece, peft_name: str, adalora_scale: float | None) -> dict:
    """``{PEFT key: array}`` of one PEFT module. AdaLoRA: ``adalora_scale`` is the scaling
    PEFT applies (α over the config's init_r); B absorbs the ratio when it differs."""
    key = f"{PEFT_PREFIX}{peft_name}."
    if piece.kind == "adalora":
        B = piece.B if adalora_scale == piece.scale else piece.B * (piece.scale / adalora_scale)
        return {key + "lora_A": piece.A, key + "lora_B": B.astype(piece.B.dtype),
                key + "lora_E": piece.E.reshape(-1, 1)}                           # (r, 1)
    out = {key + "lora_A.weight": piece.A, key + "lora_B.weight": piece.B}
    if piece.kind == "dora":
        out[key + "lora_magnitude_vector"] = piece.mag
    return out


def short_targets(adapted: list, every: list) -> list:
    """PEFT ``target_modules``: last name components when they select exactly ``adapted``
    among ``every`` Linear (PEFT matches a suffix), else the full names."""
    short = sorted({n.rpartition(".")[2] for n in adapted})
    chosen = {n for n in every if n.rpartition(".")[2] in short}
    return short if chosen == set(adapted) else sorted(adapted)


def lora_config(pieces: dict, cfg, modules_to_save, task_type, base, fan_in_fan_out) -> dict:
    """PEFT's LoraConfig fields for ``{peft name: Piece}`` saved from layers of config ``cfg``:
    the most common (r, α) is global, the others go to rank_pattern / alpha_pattern."""
    def alpha_of(r):
        ratio = r / cfg.r
        return cfg.alpha * (math.sqrt(ratio) if getattr(cfg, "rslora", False) else ratio)
    ranks = {name: int(p.A.shape[0]) for name, p in pieces.items()}
    r, _ = Counter(ranks.values()).most_common(1)[0]
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha_of(r),
            "rank_pattern": {n: k for n, k in ranks.items() if k != r},
            "alpha_pattern": {n: alpha_of(k) for n, k in ranks.items() if k != r},
            "use_rslora": bool(getattr(cfg, "rslora", False)),
            "use_dora": cfg.variant == "dora", "init_lora_weights": True,
            **_common(cfg, modules_to_save, task_type, base, fan_in_fan_out)}


def adalora_config(init_r: int, patterns: dict, cfg, modules_to_save, task_type, base,
                   fan_in_fan_out) -> dict:
    """PEFT's AdaLoraConfig: ``rank_pattern`` is ``{module.lora_E: [bool] * init_r}``; PEFT
    refuses ``total_step`` None, so an open schedule saves the smallest valid one."""
    total = cfg.total_step or cfg.tinit + cfg.tfinal + 1
    return {"peft_type": "ADALORA", "r": 8, "init_r": init_r,   # PEFT ignores r (and warns
                                                                # unless it is its default 8)
            "target_r": min(cfg.target_r, init_r), "lora_alpha": cfg.alpha,
            "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.deltaT,
            "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
            "total_step": total,
            "rank_pattern": {f"{n}.lora_E": list(p) for n, p in patterns.items()},
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            **_common(cfg, modules_to_save, task_type, base, fan_in_fan_out)}


def _common(cfg, modules_to_save, task_type, base, fan_in_fan_out) -> dict:
    return {"lora_dropout": cfg.dropout, "bias": cfg.bias, "modules_to_save": modules_to_save,
            "task_type": task_type, "base_model_name_or_path": base,
            "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "revision": None,
            "layers_to_transform": None, "layers_pattern": None}


# --- PEFT tensors -> lowrank layers -------------------------------------------------------------

def pattern_value(patterns: dict, name: str, default):
    """PEFT's lookup of a per-module pattern (rank_pattern / alpha_pattern): the key is a
    regex matched as a suffix of the module name (``(.*\\.)?key$``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def split_module(peft_name: str, tensors: dict, peft_config: dict, parts: list,
                 where: str) -> list:
    """``[(lowrank name, variant, config fields, {param: host array})]`` for one PEFT module
    ``tensors`` (suffix -> array); ``parts`` is ``[(lowrank name, part)]`` (c_attn: three)."""
    adalora = peft_config["peft_type"] == "ADALORA"
    wanted = ("lora_A", "lora_B") + (("lora_E",) if adalora else ())
    names = ADALORA_KEYS if adalora else LORA_KEYS
    found = {p: tensors.pop(names[p]) for p in list(names) if names[p] in tensors}
    if tensors:
        raise ValueError(f"{where}: unexpected key {PEFT_PREFIX}{peft_name}.{sorted(tensors)[0]}"
                         f" (a {peft_config['peft_type']} adapter has {sorted(names.values())})")
    missing = [names[p] for p in wanted if p not in found]
    if missing:
        raise ValueError(f"{where}: module {peft_name!r} has no {missing[0]!r} tensor "
                         "(the file is incomplete)")
    A, B = found["lora_A"], found["lora_B"]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"{where}: module {peft_name!r}: lora_A {A.shape} and lora_B "
                         f"{B.shape} are not a (r, n), (m, r) pair")
    r = A.shape[0]
    fields = {"dropout": float(peft_config.get("lora_dropout") or 0.0),
              "bias": peft_config.get("bias") or "none"}
    if adalora:
        init_r = int(peft_config.get("init_r") or r)
        pattern = pattern_value(peft_config.get("rank_pattern"), f"{peft_name}.lora_E",
                                [True] * init_r)
        if len(pattern) != init_r or sum(map(bool, pattern)) != r:
            raise ValueError(f"{where}: module {peft_name!r}: rank_pattern keeps "
                             f"{sum(map(bool, pattern))} of {len(pattern)} triplets, the "
                             f"tensors hold {r} of init_r={init_r}")
        keep = np.flatnonzero(np.asarray(pattern, dtype=bool))
        E = found["lora_E"].reshape(-1)
        full_A = np.zeros((init_r, A.shape[1]), A.dtype)
        full_E = np.zeros((init_r,), E.dtype)
        full_A[keep], full_E[keep] = A, E
        fields.update(r=init_r, alpha=float(peft_config["lora_alpha"]),
                      target_r=min(int(peft_config.get("target_r") or init_r), init_r),
                      **{k: peft_config[k] for k in ("tinit", "tfinal", "deltaT", "beta1",
                                                     "beta2", "orth_reg_weight", "total_step")
                         if peft_config.get(k) is not None})
        variant, shared = "adalora", {"lora_A": full_A, "lora_E": full_E}
        full_B = np.zeros((B.shape[0], init_r), B.dtype)
        full_B[:, keep] = B
        B, extra = full_B, {"rank_pattern": [bool(v) for v in pattern]}
    else:
        variant = "dora" if peft_config.get("use_dora") else "lora"
        alpha = pattern_value(peft_config.get("alpha_pattern"), peft_name,
                              peft_config.get("lora_alpha", 8))
        fields.update(r=r, alpha=float(alpha), rslora=bool(peft_config.get("use_rslora")))
        shared, extra = {"lora_A": A}, {}
    split = len(parts) > 1 or parts[0][1] is not None
    rows = B.shape[0] // FUSED_PARTS if split else B.shape[0]
    out = []
    for name, part in parts:
        block = slice(None) if not split else slice(part * rows, (part + 1) * rows)
        params = {**shared, "lora_B": B[block]}
        if "lora_magnitude_vector" in found:
            params["lora_magnitude_vector"] = found["lora_magnitude_vector"][block]
        elif variant == "dora":
            raise ValueError(f"{where}: module {peft_name!r}: use_dora is set but there is no "
                             "lora_magnitude_vector tensor (the file is incomplete)")
        out.append((name, variant, dict(fields), params, extra))
    return out
