"""``lowrank demo``: pretrain on Python's own documentation, adapt to its standard library's
source with full fine-tuning and every registered adapter variant at the same budget, and
compare. Offline: both corpora ship with CPython. The base model is cached in ``out/base``.
"""
from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from .. import adapters
from . import workflows as wf
from ..training.trainer import Trainer, TrainConfig

# the base: small enough to pretrain in well under a minute on 2 cores
BASE = wf.ModelSpec(vocab_size=1024, context=64, n_layer=2, n_head=4, d_model=128)
DOCS, CODE = wf.DataSpec("docs"), wf.DataSpec("code", max_bytes=1_000_000)
TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
ADAPTER = {"r": 8, "alpha": 16.0}
LR = {"full": 1e-3, "vera": 1e-2}   # adapters train at DEFAULT_LR; VeRA's few scalars faster
DEFAULT_LR = 4e-3
MEMORY_STEPS = 3             # steps traced for peak memory (every step allocates alike)
# extra rows for variants whose options change the story (beyond their default config)
EXTRA_ROWS = {"lora": [("lora+pissa", {"init": "pissa"}), ("lora+ (λ=16)", {}),
                       ("qlora (nf4)", {})],
              "svd": [("svd (U,σ)", {"train": ("U", "S")})]}


# rows trained differently from their variant's default (docs/variants.md#loraplus, #nf4)
RUN_OPTIONS = {"lora+ (λ=16)": {"loraplus_lr_ratio": 16.0}, "qlora (nf4)": {"quantize": "nf4"}}


def rows():
    """``(label, variant, options)`` for full fine-tuning and every registered variant."""
    out = [("full", "full", None)]
    for name in adapters.available():
        out.append((name, name, dict(ADAPTER)))
        out += [(label, name, {**ADAPTER, **extra}) for label, extra in EXTRA_ROWS.get(name, [])]
    return out


def _base(out: Path, steps: int, dtype: str, seed: int, progress: bool) -> Path:
    base = out / "base"
    want = {"steps": steps, "spec": BASE.__dict__, "dtype": dtype, "seed": seed}
    run = wf.read_run(base)
    if run.get("demo") == want and (base / "model.safetensors").exists():
        print(f"using the cached base model in {base}")
        return base
    print(f"pretraining the base model on Python's documentation ({steps} steps) ...")
    train = TrainConfig(steps=steps, batch_size=16, lr=3e-3, min_lr=3e-4, warmup=20, seed=seed)
    result = wf.pretrain(base, BASE, DOCS, train, dtype=dtype, progress=progress, force=True)
    run = wf.read_run(base)
    run["demo"] = want
    wf._write_run(base, run)
    print(f"  base: {result.total:,} parameters, docs validation loss {result.val_loss:.3f}, "
          f"{result.tokens_per_s:,.0f} tokens/s")
    return base


def run_demo(out="lowrank-demo", pretrain_steps=600, finetune_steps=200, dtype="float32",
             seed=0, progress=True) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = _base(out, pretrain_steps, dtype, seed, progress)
    model, tok, _ = wf.load_base(base)
    code = wf.token_data(tok, CODE, BASE.context)
    docs = wf.token_data(tok, DOCS, BASE.context)
    print(f"fine-tuning on the standard library's source: {code.num_tokens('train'):,} tokens")
    results = [{"label": "base (no fine-tuning)", "trainable": 0,
                "total": model.num_parameters(), "code_loss": wf.evaluate(model, code),
                "docs_loss": wf.evaluate(model, docs), "tokens_per_s": float("nan"),
                "peak_mb": float("nan"), "curve": []}]
    for label, variant, options in rows():
        # peak memory: traced over model load, injection and the first steps (optimizer state
        # and activations included), then tracing stops so it does not slow the timed steps
        tracemalloc.start()
        model, _, _ = wf.load_base(base)
        run = RUN_OPTIONS.get(label, {})
        wf.prepare_finetune(model, variant, TARGETS, options or {}, seed=seed,
                            quantize=run.get("quantize"))
        train = TrainConfig(steps=finetune_steps, batch_size=16, lr=LR.get(variant, DEFAULT_LR),
                            min_lr=LR.get(variant, DEFAULT_LR) / 10, warmup=10, seed=seed,
                            loraplus_lr_ratio=run.get("loraplus_lr_ratio"))
        trainer = Trainer(model, code, train)
        peak = []

        def stop_tracing(tr, record, peak=peak):
            if not peak and (tr.step >= MEMORY_STEPS or tr.step == tr.config.steps):
                peak.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
        history = trainer.fit(stop_tracing, progress=progress, desc=label)
        peak = peak[0]
        row = {"label": label, "trainable": model.num_parameters(True),
               "total": model.num_parameters(), "code_loss": wf.evaluate(model, code),
               "docs_loss": wf.evaluate(model, docs),
               "tokens_per_s": wf._median_speed(history[MEMORY_STEPS:] or history),
               "peak_mb": peak / 2**20,
               "curve": [h["loss"] for h in history]}
        row.update(_variant_report(model))
        results.append(row)
        print(f"  {label:<14} code {row['code_loss']:.3f}  docs {row['docs_loss']:.3f}  "
              f"{row['tokens_per_s']:,.0f} tok/s")
    table = format_table(results)
    print()
    print(terminal_table(table))
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    png = plot(results, out / "loss_curves.png")
    print(f"\nwrote {png} and {out / 'results.md'} in {time.perf_counter() - start:.0f} s")
    return results


def _variant_report(model) -> dict:
    """Per-variant facts worth a column (e.g. the rank each module kept), if the variant has any."""
    notes = {}
    for cls in {type(m) for _, m in adapters.adapted_modules(model)}:
        notes.update(cls.report(model, None).facts)   # None: no files, the facts only
    notes = {name: note for name, note in notes.items() if note}
    return {"notes": notes} if notes else {}


def summary(notes: dict | None) -> str:
    """One cell from the per-module facts of the variants' reports: ranks kept, sparsity."""
    if not notes:
        return ""
    rows = list(notes.values())
    parts = []
    for key, label in (("rank", "rank"), ("kept_rank", "kept rank"), ("ranknum", "rank")):
        if key in rows[0]:
            ranks = [r[key] for r in rows]
            start = sum(r.get("init_r", r.get("r", 0)) for r in rows)
            parts.append(f"{label} {min(ranks)}–{max(ranks)} per module, total {sum(ranks)}"
                         + (f" of {start}" if start else ""))
            if "target_r" in rows[0]:
                parts.append(f"budget Σ target_r = {sum(r['target_r'] for r in rows)}")
    if "nnz" in rows[0]:
        sparse, dense = sum(r["sparse_bytes"] for r in rows), sum(r["dense_bytes"] for r in rows)
        parts.append(f"nnz {sum(r['nnz'] for r in rows):,}: {sparse / 1024:.1f} KiB sparse vs "
                     f"{dense / 1024:.0f} KiB dense ΔW")
    if "restarts" in rows[0]:
        parts.append(f"{rows[0]['restarts']} restarts")
    return "; ".join(parts)


def format_table(results) -> str:
    lines = ["| variant | trainable params | % of model | val loss, code | loss kept, docs "
             "| tokens/s | peak MB | notes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        share = 100.0 * r["trainable"] / r["total"]
        speed = "–" if np.isnan(r["tokens_per_s"]) else f"{r['tokens_per_s']:,.0f}"
        peak = "–" if np.isnan(r["peak_mb"]) else f"{r['peak_mb']:.1f}"
        lines.append(f"| {r['label']} | {r['trainable']:,} | {share:.2f} | {r['code_loss']:.3f} "
                     f"| {r['docs_loss']:.3f} | {speed} | {peak} | {summary(r.get('notes'))} |")
    return "\n".join(lines)


def terminal_table(markdown: str) -> str:
    """A Markdown table (the files keep it) as aligned columns for a terminal: the ``|`` and
    the ``---`` row dropped, numbers right-aligned where the Markdown says ``---:``."""
    lines = markdown.splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    if len(table) < 2:
        return markdown
    rows = [[c.strip() for c in lines[i].strip("|").split("|")] for i in table]
    right = [c.endswith(":") for c in rows[1]]
    rows = [rows[0]] + rows[2:]
    widths = [max(len(r[k]) for r in rows if k < len(r)) for k in range(len(rows[0]))]
    text = ["  ".join(cell.rjust(w) if right[k] else cell.ljust(w)
                      for k, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines[:table[0]] + text + lines[table[-1] + 1:])


def curves_figure(results, window: int, ylabel: str, title: str):
    """``(plt, fig, right axes)``: training curves (``window``-step means) drawn on the left
    panel of a two-panel figure; the caller fills the right one and calls ``save_figure``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    from cycler import cycler
    # ten distinct colours, then the same ten dashed, dotted, ...: no two curves alike
    left.set_prop_cycle(cycler(linestyle=["-", "--", ":", "-."])
                        * cycler(color=plt.cm.tab10(np.arange(10)).tolist()))
    for r in results:
        if r["curve"]:
            curve = np.asarray(r["curve"])
            smooth = np.convolve(curve, np.ones(window) / window, mode="valid") \
                if len(curve) > window else curve
            left.plot(np.arange(len(smooth)) + (len(curve) - len(smooth)), smooth, label=r["label"])
    left.set(xlabel="step", ylabel=f"{ylabel} ({window}-step mean)", title=title)
    left.legend(fontsize=8, ncol=2)
    return plt, fig, right


def save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results, path: Path) -> Path:
    plt, fig, right = curves_figure(results, 10, "training cross-entropy on code",
                                    "Fine-tuning on the standard library's source")
    labels = [r["label"] for r in results]
    x = np.arange(len(results))
    right.bar(x - 0.2, [r["code_loss"] for r in results], 0.4, label="code (target)")
    right.bar(x + 0.2, [r["docs_loss"] for r in results], 0.4, label="docs (kept)")
    right.set_xticks(x, labels, rotation=30, ha="right")
    low = min(min(r["code_loss"], r["docs_loss"]) for r in results)
    right.set_ylim(bottom=max(0.0, low - 0.5))
    right.set(ylabel="validation loss", title="After fine-tuning")
    right.legend()
    return save_figure(plt, fig, path)
