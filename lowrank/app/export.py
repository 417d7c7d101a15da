"""``lowrank export``: a fine-tuned model out to the tools that serve it (docs/export.md).

``hf``: the merged model as a Hugging Face directory; ``gguf``: the merged model as a GGUF
file in llama.cpp's layout (F32, F16, Q8_0, Q4_0, Q4_1); ``peft``: the adapter alone, in
PEFT's format. Merging is always done in float32 on the dequantised base; a quantized output
re-quantises the merged weights, and the error that costs is measured and said.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..adapters import adapted_modules, merge_and_unload
from ..files.gguf_file import gguf_metadata, open_gguf
from ..files.locate import gguf_file
from ..formats.export_gguf import TYPES, write_gguf
from ..formats.export_hf import check_exportable, write_hf_dir
from ..formats.peft_dir import save_pretrained
from ..text.chat_template import ChatTemplate
from .workflows import load_base, load_finetuned

FORMATS = ("hf", "gguf", "peft")


def _base_types(base) -> dict:
    """``{type: count}`` of the matrices of a GGUF base (empty for a float directory)."""
    file = gguf_file(base)
    if file is None:
        return {}
    opened = open_gguf(file)
    shapes, counts = opened.shapes(), {}
    for name, kind in opened.types().items():
        if len(shapes[name]) == 2:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _template(base):
    try:
        return ChatTemplate.from_pretrained(base)
    except ValueError:   # a model without one: written without
        return None


def _write_peft(model, out: Path) -> dict:
    if out.exists():
        raise ValueError(f"{out} exists already: the export writes a new path (remove it or "
                         "name another)")
    if not adapted_modules(model):
        raise ValueError("export --format peft needs an adapter directory (a full fine-tune "
                         "has no adapter: export it as hf or gguf)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_pretrained(model, tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "format": "peft",
            "notes": [f"wrote {out} (the adapter alone, unmerged: PEFT's format where PEFT "
                      "has the variant, else lowrank's)"]}


def export(model, adapter, out, fmt: str = "hf", gguf_type: str = "F32") -> dict:
    """Export ``model`` (a base: directory, GGUF file or name) with the fine-tune in
    ``adapter`` (None: the base alone) to ``out``. Returns what was written, with ``notes``:
    lines saying how the merge was done and what re-quantising cost."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "gguf" and gguf_type not in TYPES:
        raise ValueError(f"--type must be one of {TYPES} for a GGUF export, got {gguf_type!r}")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists already: the export writes a new path (remove it or "
                         "name another)")
    if adapter is None:
        loaded, tok, _ = load_base(model, "float32")
    else:
        loaded, tok = load_finetuned(model, adapter, "float32")
    if fmt == "peft":
        return _write_peft(loaded, out)
    check_exportable(loaded, out)
    notes = []
    types = {t: n for t, n in _base_types(model).items() if t not in ("F32",)}
    merged = bool(adapted_modules(loaded))
    if merged:
        merge_and_unload(loaded)
    what = "merged the adapter in float32" if merged else "no adapter to merge"
    if types:
        listed = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
        notes.append(f"the base's matrices ({listed}) were dequantised exactly as stored; "
                     f"{what}")
    else:
        notes.append(what.capitalize())
    template = _template(model)
    if fmt == "hf":
        write_hf_dir(loaded, out, tok, template)
        notes.append(f"wrote {out} (float32 safetensors, tokenizer, chat template"
                     f"{'' if template else ': none'})")
        return {"path": str(out), "format": "hf", "notes": notes}
    file = gguf_file(model)
    report = write_gguf(loaded, out, tok, template, gguf_type,
                        gguf_metadata(file) if file is not None else None)
    if gguf_type == "F32":
        notes.append(f"wrote {out} as F32 (no re-quantisation: the merged weights exactly)")
    else:
        notes.append(f"re-quantised the merged weights to {gguf_type}: weight error rms "
                     f"{report['weight_rms_error']:.3g} (relative {report['relative_rms_error']:.3g}),"
                     f" max {report['weight_max_error']:.3g}; wrote {out}")
    return {**report, "format": "gguf", "notes": notes}


def add_arguments(p) -> None:
    """``lowrank export``'s flags on the sub-parser ``p``."""
    p.add_argument("--model", required=True,
                   help="the base: a model directory, a GGUF file, or 'smollm2'")
    p.add_argument("--adapter", default=None,
                   help="the fine-tune to merge: an adapter directory (lowrank's or PEFT's) "
                        "or a full fine-tune (default: the base alone)")
    p.add_argument("--out", required=True, help="the path to write (must not exist)")
    p.add_argument("--format", dest="export_format", choices=FORMATS, default="hf",
                   help="hf: a Hugging Face directory; gguf: one GGUF file; peft: the adapter "
                        "alone (docs/export.md)")
    p.add_argument("--type", dest="gguf_type", choices=TYPES, default="F32",
                   help="GGUF storage of the matrices (--format gguf)")


def run(args) -> int:
    report = export(args.model, args.adapter, args.out, args.export_format, args.gguf_type)
    for note in report.get("notes", [f"wrote {report['path']}"]):
        print(note)
    return 0


__all__ = ["export", "FORMATS", "add_arguments", "run"]
