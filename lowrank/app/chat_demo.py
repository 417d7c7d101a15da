"""``lowrank demo --task chat``: SmolLM2-135M-Instruct answers "Is this review positive or
negative?" about the shipped sentiment sentences; its zero-shot accuracy (exact match of the
greedy answer) on the 200 validation sentences of the classify task's split, then after LoRA
(and any other variant asked for) on training sentences; a table and a plot.

Budget (≤ 10 minutes on 2 cores): the first ``TRAIN_EXAMPLES`` training sentences, one epoch
of batch 8 at lr 5e-4 (a short run needs a larger step than the recipe's 2e-4), answers of at
most 3 tokens ("positive" and the end of turn). Otherwise the chat recipe (docs/chat.md).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import adapters
from ..backend import threads
from ..tasks import chat, chat_io
from ..tasks.chat_data import ChatData
from ..tasks.text_data import sentiment_split
from .demo import curves_figure, save_figure, summary
from .sentiment_demo import fresh_copy

QUESTION = "Is this review positive or negative? Answer with one word.\n\nReview: "
ANSWERS = {"0": "negative", "1": "positive"}   # a label index, or its name already
TRAIN_EXAMPLES, LR, MAX_NEW_TOKENS = 256, 5e-4, 3
BASE_NOTE = {"keep": " over the base kept in its GGUF blocks", "nf4": " over an NF4 base"}
VARIANT_OPTIONS = {"adalora": {"init_r": 12, "target_r": 8},
                   "relora": {"reset_interval": 10, "restart_warmup": 2},
                   "increlora": {"init_warmup": 3, "incre_interval": 3}}


def sentiment_conversations(examples) -> list[list[dict]]:
    """Each labelled sentence as a question and its one-word answer."""
    return [[{"role": "user", "content": QUESTION + e.text},
             {"role": "assistant", "content": ANSWERS.get(e.label, e.label)}] for e in examples]


def demo_data():
    """``(train conversations, validation conversations)`` of the classify task's split."""
    train, val = sentiment_split()
    return sentiment_conversations(train), sentiment_conversations(val)


def run_demo(out="lowrank-demo-chat", variants=("lora",), train_examples: int = TRAIN_EXAMPLES,
             val_examples: int = 200, base="smollm2", lr: float = LR, batch_size: int = 8,
             progress: bool = True, quantize: str | None = None,
             shards: int | None = None) -> list[dict]:
    """``quantize``: the rows train over the base kept in the GGUF's blocks ("keep") or in
    NF4; ``shards``: batch shards on threads (default: the usable cores)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out)
    unknown = sorted(set(variants) - set(adapters.available()))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {adapters.available()}")
    train, val = demo_data()
    train, val = train[:train_examples], val[:val_examples]
    model, tok, template = chat_io.load_base(base)
    length = min(256, model.config.max_position_embeddings)
    config = chat.ChatConfig(batch_size=batch_size, lr=lr, max_length=length,
                             max_new_tokens=MAX_NEW_TOKENS,
                             shards=threads.usable_cores() if shards is None else shards)
    data = ChatData.from_conversations(template, tok, {"train": train, "val": val}, length)
    print(f"SmolLM2-135M-Instruct sentiment as a chat: {len(train)} training conversations, "
          f"{len(val)} validation; rows: zero-shot, {', '.join(variants)}"
          + BASE_NOTE.get(quantize, "")
          + f"; {config.shards} batch shard(s)", flush=True)

    def accuracy(m):
        return chat.evaluate_accuracy(m, tok, template, val, MAX_NEW_TOKENS)["accuracy"]

    zero = {"label": "zero-shot", "trainable": 0, "total": model.num_parameters(),
            "val_accuracy": accuracy(model), "val_loss": chat.evaluate_loss(
                model, data, "val", batch_size)["loss"], "tokens_per_s": float("nan"),
            "curve": []}
    print(f"  zero-shot  val accuracy {zero['val_accuracy']:.4f}", flush=True)
    results = [zero]
    for name in variants:
        m = fresh_copy(model)
        chat.prepare(m, name, VARIANT_OPTIONS.get(name), seed=config.seed, quantize=quantize)
        data._order, data._pos = None, 0
        result = chat.train_chat(m, data, config, progress=progress)
        row = {"label": name, "trainable": m.num_parameters(True), "total": m.num_parameters(),
               "val_accuracy": accuracy(m),
               "val_loss": chat.evaluate_loss(m, data, "val", batch_size)["loss"],
               "tokens_per_s": result["tokens_per_s"],
               "curve": [h["loss"] for h in result["history"]]}
        facts = {}
        for cls in {type(a) for _, a in adapters.adapted_modules(m)}:
            facts.update(cls.report(m, None).facts)   # None: no files, the facts only
        notes = {n: facts.get(n, {}) for n, _ in adapters.adapted_modules(m)}
        if any(notes.values()):
            row["notes"] = notes
        results.append(row)
        print(f"  {name:<10} val accuracy {row['val_accuracy']:.4f}  "
              f"{row['tokens_per_s']:,.0f} train tok/s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results, len(train), len(val),
                         ("SmolLM2-135M-Instruct" if base == "smollm2" else Path(base).name)
                         + BASE_NOTE.get(quantize, ""))
    print()
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    png = plot(results, out / "chat.png", len(val))
    print(f"\nwrote {png} and {out / 'results.md'} in {time.perf_counter() - start:.0f} s "
          f"({time.process_time() - cpu_start:.0f} s of CPU time, all threads)")
    return results


def format_table(results, n_train: int, n_val: int,
                 name: str = "SmolLM2-135M-Instruct") -> str:
    lines = [f"{name}, sentiment as a chat: {n_train} training conversations x "
             f"1 epoch, {n_val} validation; exact match of the greedy answer", "",
             "| setup | trainable params | % of model | val accuracy | val loss "
             "| train tokens/s | notes |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        share = 100.0 * r["trainable"] / r["total"]
        speed = "–" if np.isnan(r["tokens_per_s"]) else f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['label']} | {r['trainable']:,} | {share:.2f} | "
                     f"{r['val_accuracy']:.4f} | {r['val_loss']:.4f} | {speed} | "
                     f"{summary(r.get('notes'))} |")
    return "\n".join(lines)


def plot(results, path: Path, n_val: int) -> Path:
    plt, fig, right = curves_figure(results, 4, "cross-entropy of the answer",
                                    "Instruction-tuning SmolLM2 on sentiment")
    x = np.arange(len(results))
    right.bar(x, [r["val_accuracy"] for r in results], 0.6)
    right.set_xticks(x, [r["label"] for r in results], rotation=30, ha="right")
    right.set_ylim(0.0, 1.0)
    right.set(ylabel=f"exact-match accuracy ({n_val} sentences)", title="Greedy answers")
    return save_figure(plt, fig, path)


__all__ = ["QUESTION", "demo_data", "run_demo", "sentiment_conversations"]
