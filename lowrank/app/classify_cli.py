"""The command line of the classification task (``lowrank.app.cli`` hands these over):

    lowrank finetune --base minilm --task classify [--data train.tsv] [--eval-data val.tsv]
                     --variant lora --out DIR          # prints validation accuracy per epoch
    lowrank eval --model minilm --adapter DIR --data test.tsv   # accuracy 0.xxxx (n/N)
    lowrank predict --model minilm --adapter DIR "text" ...     # label and probabilities
    lowrank demo --task sentiment [--out DIR]                   # every variant, a table, a plot

The flags are parsed by the CLI's one parser (``lowrank.app.cli_parser``); this module runs them.
Bad input (a line without a tab, an unknown label, an empty file, non-UTF-8 text) prints one
line naming the file and line and writes nothing.
"""
from __future__ import annotations

import json
import sys

from ..adapters import available
from ..tasks import classify, classify_io as io
from .sentiment_demo import run_demo


def handles(args) -> bool:
    """Whether parsed ``args`` are a classification command (the rest are the CLI's own)."""
    return (args.command == "predict"
            or (args.command == "eval" and args.data is not None)
            or getattr(args, "task", None) in ("classify", "sentiment"))


def _say(args):
    """Where the lines for a person go: stdout, or stderr when stdout carries --json."""
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda line: print(line, file=stream, flush=True)


def run(args, data_options: dict) -> int:
    """Run a parsed classification command; ``data_options``: the reader's format and column
    options (``cli_task_flags.data_options``)."""
    say = _say(args)
    if args.command == "finetune":
        if args.variant not in ("head", "full", *available()):
            raise ValueError(f"unknown variant {args.variant!r}; choose head, full or one "
                             f"of {available()}")
        train, val = io.load_examples(args.data, args.eval_data, args.max_examples,
                                      **data_options)
        config = classify.ClassifyConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, max_length=args.max_length, pooling=args.pooling,
            model_dropout=args.model_dropout, seed=args.seed,
            schedule=args.lr_schedule or "linear", adamw=args.adamw)
        say(f"{args.variant}: {len(train):,} training examples"
            + (f", {len(val):,} validation" if val is not None else ""))

        def on_epoch(epoch, row):
            line = f"epoch {epoch}: train loss {row['train_loss']:.4f}"
            if "val_accuracy" in row:
                line += (f"  val loss {row['val_loss']:.4f}  val accuracy "
                         f"{row['val_accuracy']:.4f} ({row['val_correct']}/{row['val_count']})")
                if "val_macro_f1" in row:
                    line += f"  macro-F1 {row['val_macro_f1']:.4f}"
            say(line)

        targets = classify.TARGETS if args.targets is None else \
            [t for t in args.targets.split(",") if t]
        options = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout,
                   **args.variant_options}
        result = io.finetune(args.out, args.base, args.variant, config, train, val,
                             options, targets, args.dtype, on_epoch,
                             not args.no_progress, args.shards)
        info = result["info"]
        share = 100.0 * info["trainable"] / info["total"]
        best = result["best"]
        say(f"{args.variant}: {info['trainable']:,} trainable parameters ({share:.2f}%); "
            f"{result['tokens_per_s']:,.0f} train tokens/s; best epoch "
            f"{best.get('epoch', len(info['epochs']))} saved to {args.out} "
            f"(last epoch in {args.out}/last)")
        if args.json:
            print(json.dumps({"command": "finetune", "task": "classify", "out": str(args.out),
                              "variant": args.variant, "labels": info["labels"],
                              "trainable": info["trainable"], "total": info["total"],
                              "best_epoch": best.get("epoch", len(info["epochs"])),
                              "epochs": info["epochs"], "steps": result["steps"],
                              "train_seconds": result["train_seconds"],
                              "tokens_per_s": result["tokens_per_s"]}))
    elif args.command == "eval":
        if args.adapter is None:
            raise ValueError("eval --data scores a classifier: pass --adapter DIR (a "
                             "directory `finetune --task classify` wrote)")
        m = io.evaluate_file(args.adapter, args.data, base=args.model,
                             batch_size=args.batch_size, **data_options)
        line = f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['count']})"
        if "macro_f1" in m:
            line += f"  macro-F1 {m['macro_f1']:.4f}"
        print(json.dumps({"command": "eval", **m}) if args.json else line)
    elif args.command == "predict":
        for text, p in zip(args.texts, io.predict(args.adapter, args.texts, base=args.model)):
            if args.json:
                print(json.dumps({"text": text, **p}))
                continue
            probs = "  ".join(f"{k} {v:.4f}" for k, v in p["probabilities"].items())
            print(f"{p['label']}\t{p['probabilities'][p['label']]:.4f}\t[{probs}]\t{text}")
    elif args.command == "demo":
        variants = None if args.variants is None else args.variants.split(",")
        run_demo(args.out, epochs=args.epochs, variants=variants,
                 train_examples=args.train_examples, progress=not args.no_progress)
    return 0
