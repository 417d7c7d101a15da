"""What is model-specific in PEFT's adapter format (docs/peft.md): module names and GPT-2's
fused ``c_attn``. Each variant's own tensors and config fields are its ``peft_codec``, in its
file (docs/peft.md#codecs); the files and the all-or-nothing load are in ``peft_files``.

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

import re
from typing import NamedTuple

import numpy as np

from ..adapters._peft import (FUSED_PARTS, PEFT_PREFIX, Piece, data_driven_piece,  # noqa: F401
                              pattern_value)

# lowrank block-relative name -> (GPT-2 module, part of the fused c_attn or None)
GPT2_NAMES = {"attn.q": ("attn.c_attn", 0), "attn.k": ("attn.c_attn", 1),
              "attn.v": ("attn.c_attn", 2), "attn.o": ("attn.c_proj", None),
              "mlp.fc1": ("mlp.c_fc", None), "mlp.fc2": ("mlp.c_proj", None)}


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
            mags.append(base_norms(j) if first.mag is not None else None)
            if first.E is not None:
                pattern += [False] * len(first.pattern)
            continue
        B[rows, col:col + p.A.shape[0]] = p.B
        col += p.A.shape[0]
        mags.append(p.mag)
        pattern += list(p.pattern)
    E = np.concatenate([pieces[j].E for j in parts]) if first.E is not None else None
    mag = np.concatenate(mags) if first.mag is not None else None
    return Piece(first.kind, A, B, first.scale, E, mag, tuple(pattern))


def short_targets(adapted: list, every: list) -> list:
    """PEFT ``target_modules``: last name components when they select exactly ``adapted``
    among ``every`` Linear (PEFT matches a suffix), else the full names."""
    short = sorted({n.rpartition(".")[2] for n in adapted})
    chosen = {n for n in every if n.rpartition(".")[2] in short}
    return short if chosen == set(adapted) else sorted(adapted)
