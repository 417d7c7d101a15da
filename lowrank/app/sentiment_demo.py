"""``lowrank demo --task sentiment``: MiniLM on the shipped sentiment sentences with the head
alone, full fine-tuning and every registered adapter variant; a table and a plot.

Budget (≤ 10 minutes on 2 cores): one epoch over the first ``TRAIN_EXAMPLES`` of the 1,800
training sentences, the full 200 for validation; otherwise the task's recipe
(docs/classification.md#recipe). The base is loaded once and copied for each row.
"""
from __future__ import annotations

import copy
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from .. import adapters
from ..nn.hooks import StepHook
from .demo import curves_figure, save_figure, summary, terminal_table
from ..tasks import classify, classify_io
from ..tasks.text_data import TextData, label_names

TRAIN_EXAMPLES = 1800
MEMORY_STEPS = 3   # steps traced for peak memory (later steps allocate alike)
# options beyond r=8, α=16, dropout 0.1 that fit a run of a few dozen steps
VARIANT_OPTIONS = {"adalora": {"init_r": 12, "target_r": 8},
                   "relora": {"reset_interval": 20, "restart_warmup": 2},
                   "increlora": {"init_warmup": 5, "incre_interval": 5}}


def rows(variants=None) -> list[str]:
    names = ["head", "full"] + adapters.available()
    if variants:
        unknown = sorted(set(variants) - set(names))
        if unknown:
            raise ValueError(f"unknown demo rows {unknown}; choose from {names}")
        names = [n for n in names if n in variants]
    return names


def run_demo(out="lowrank-demo-sentiment", epochs: int = 1, variants=None,
             train_examples: int = TRAIN_EXAMPLES, progress: bool = True) -> list[dict]:
    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out)
    names = rows(variants)
    train, val = classify_io.load_examples()
    train = train[:train_examples]
    labels = label_names(train)
    config = classify.ClassifyConfig(epochs=epochs)
    base, tok = classify_io.build("minilm", len(labels), config)
    data = TextData.from_examples(tok, {"train": train, "val": val}, labels, config.max_length)
    print(f"MiniLM sentiment: {len(train):,} training sentences, {len(val)} validation, "
          f"{epochs} epoch(s) per row; rows: {', '.join(names)}", flush=True)
    results = []
    for name in names:
        tracemalloc.start()
        clf = fresh_copy(base)             # the pretrained weights, fresh for each row
        classify.prepare(clf, name, VARIANT_OPTIONS.get(name), seed=config.seed)
        peak = []
        data._order, data._pos = None, 0
        result = _train(clf, data, name, config, peak, progress)
        row = {"label": name, "trainable": clf.num_parameters(True),
               "total": clf.num_parameters(), "val_accuracy": result["epochs"][-1]["val_accuracy"],
               "tokens_per_s": result["tokens_per_s"], "peak_mb": peak[0] / 2**20,
               "seconds": result["train_seconds"],
               "curve": [h["loss"] for h in result["history"]]}
        facts = {}
        for cls in {type(m) for _, m in adapters.adapted_modules(clf)}:
            facts.update(cls.report(clf, None).facts)   # None: no files, the facts only
        notes = {n: facts.get(n, {}) for n, _ in adapters.adapted_modules(clf)}
        if notes:
            row["notes"] = notes
        results.append(row)
        print(f"  {name:<10} val accuracy {row['val_accuracy']:.4f}  "
              f"{row['tokens_per_s']:,.0f} tok/s  peak {row['peak_mb']:.0f} MB", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results, len(train), epochs)
    print()
    print(terminal_table(table))
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    png = plot(results, out / "sentiment.png")
    print(f"\nwrote {png} and {out / 'results.md'} in {time.perf_counter() - start:.0f} s "
          f"({time.process_time() - cpu_start:.0f} s of CPU time, all threads)")
    return results


def fresh_copy(model):
    """A deep copy of ``model`` sharing only the array modules its streams refer to."""
    xp = model.xp
    return copy.deepcopy(model, {id(np): np, id(xp): xp})


def _train(clf, data, name, config, peak, progress) -> dict:
    """Train one row; tracing (for peak memory) stops after MEMORY_STEPS steps so it does not
    slow the timed ones."""
    trainer_steps = []

    class StopTracing(StepHook):
        def after_step(self, trainer):
            trainer_steps.append(trainer.step)
            if not peak and len(trainer_steps) >= MEMORY_STEPS:
                peak.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()

    result = classify.train_classifier(clf, data, name, config, progress=progress,
                                       extra_hooks=[StopTracing()])
    if not peak:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return result


def format_table(results, n_train: int, epochs: int) -> str:
    lines = [f"MiniLM (all-MiniLM-L6-v2) sentiment: {n_train:,} training sentences x {epochs} "
             "epoch(s), 200 validation", "",
             "| setup | trainable params | % of model | val accuracy | train tokens/s "
             "| peak MB | notes |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        share = 100.0 * r["trainable"] / r["total"]
        lines.append(f"| {r['label']} | {r['trainable']:,} | {share:.2f} | "
                     f"{r['val_accuracy']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_mb']:.0f} | {summary(r.get('notes'))} |")
    return "\n".join(lines)


def plot(results, path: Path) -> Path:
    plt, fig, right = curves_figure(results, 5, "training cross-entropy",
                                    "Fine-tuning MiniLM on sentiment")
    x = np.arange(len(results))
    bars = right.bar(x, [r["val_accuracy"] for r in results], 0.6)
    right.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    right.set_xticks(x, [r["label"] for r in results], rotation=30, ha="right")
    right.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance (2 classes)")
    right.set_ylim(0.0, 1.1)            # from 0: bar heights compare as accuracies do
    right.legend(loc="lower right", fontsize=8)
    right.set(ylabel="validation accuracy (200 sentences)", title="After fine-tuning")
    return save_figure(plt, fig, path)
