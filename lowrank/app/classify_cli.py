"""The command line of the classification task (``lowrank.app.cli`` hands these over):

    lowrank finetune --base minilm --task classify [--data train.tsv] [--eval-data val.tsv]
                     --variant lora --out DIR          # prints validation accuracy per epoch
    lowrank eval --model minilm --adapter DIR --data test.tsv   # accuracy 0.xxxx (n/N)
    lowrank predict --model minilm --adapter DIR "text" ...     # label and probabilities
    lowrank demo --task sentiment [--out DIR]                   # every variant, a table, a plot

Bad input (a line without a tab, an unknown label, an empty file, non-UTF-8 text) prints one
line naming the file and line and writes nothing.
"""
from __future__ import annotations

import argparse
import sys

from ..adapters import available, field_from_text
from ..tasks import classify, classify_io as io
from .sentiment_demo import run_demo

COMMANDS = ("finetune", "eval", "predict", "demo")


def handles(argv) -> bool:
    """Whether ``argv`` is a classification command (the CLI's other commands stay its own)."""
    if not argv or argv[0] not in COMMANDS:
        return False
    if argv[0] == "predict":
        return True
    if argv[0] == "eval":
        return any(a == "--data" or a.startswith("--data=") for a in argv)
    return any(a == "--task" or a.startswith("--task=") for a in argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank", description="text classification")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="fine-tune a BERT encoder and a head on labelled text")
    p.add_argument("--task", choices=("classify",), required=True)
    p.add_argument("--base", required=True, help="Hugging Face BERT directory or 'minilm'")
    p.add_argument("--data", default=None, help="text<TAB>label file (default: the shipped "
                                                "sentiment sentences, 1,800 of them)")
    p.add_argument("--eval-data", default=None, help="validation file (default with the "
                                                     "shipped data: its 200 held out)")
    p.add_argument("--variant", default="lora", help=f"'head', 'full' or one of {available()}")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="default 5e-4 (adapters), 5e-5 (full), 1e-3 (head)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    p.add_argument("--model-dropout", type=float, default=0.1)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.1, help="adapter dropout")
    p.add_argument("--targets", default=",".join(classify.TARGETS))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other field of the variant's config (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--shards", type=int, default=1, help="split each batch over this many "
                   "threads, one BLAS thread each (docs/performance.md#batch-shards)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="accuracy of a fine-tuned classifier on a labelled file")
    p.add_argument("--model", required=True, help="the base: BERT directory or 'minilm'")
    p.add_argument("--adapter", required=True, help="directory `finetune --task classify` wrote")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("predict", help="labels and probabilities for texts")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("texts", nargs="+")

    p = sub.add_parser("demo", help="sentiment on MiniLM: head only, full and every variant")
    p.add_argument("--task", choices=("sentiment",), required=True)
    p.add_argument("--out", default="lowrank-demo-sentiment")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-examples", type=int, default=1800,
                   help="train on the first N of the 1,800 training sentences")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lowrank {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _options(args) -> dict:
    options = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, options[key] = field_from_text(key, value)
    return options


def run(args) -> int:
    if args.command == "finetune":
        if args.variant not in ("head", "full", *available()):
            raise ValueError(f"unknown variant {args.variant!r}; choose head, full or one "
                             f"of {available()}")
        train, val = io.load_examples(args.data, args.eval_data)
        config = classify.ClassifyConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, max_length=args.max_length, pooling=args.pooling,
            model_dropout=args.model_dropout, seed=args.seed)
        print(f"{args.variant}: {len(train):,} training examples"
              + (f", {len(val):,} validation" if val is not None else ""), flush=True)

        def on_epoch(epoch, row):
            line = f"epoch {epoch}: train loss {row['train_loss']:.4f}"
            if "val_accuracy" in row:
                line += (f"  val loss {row['val_loss']:.4f}  val accuracy "
                         f"{row['val_accuracy']:.4f} ({row['val_correct']}/{row['val_count']})")
                if "val_macro_f1" in row:
                    line += f"  macro-F1 {row['val_macro_f1']:.4f}"
            print(line, flush=True)

        targets = [t for t in args.targets.split(",") if t]
        result = io.finetune(args.out, args.base, args.variant, config, train, val,
                             _options(args), targets, args.dtype, on_epoch,
                             not args.no_progress, args.shards)
        info = result["info"]
        share = 100.0 * info["trainable"] / info["total"]
        best = result["best"]
        print(f"{args.variant}: {info['trainable']:,} trainable parameters ({share:.2f}%); "
              f"{result['tokens_per_s']:,.0f} train tokens/s; best epoch "
              f"{best.get('epoch', len(info['epochs']))} saved to {args.out} "
              f"(last epoch in {args.out}/last)")
    elif args.command == "eval":
        m = io.evaluate_file(args.adapter, args.data, base=args.model,
                             batch_size=args.batch_size)
        line = f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['count']})"
        if "macro_f1" in m:
            line += f"  macro-F1 {m['macro_f1']:.4f}"
        print(line)
    elif args.command == "predict":
        for text, p in zip(args.texts, io.predict(args.adapter, args.texts, base=args.model)):
            probs = "  ".join(f"{k} {v:.4f}" for k, v in p["probabilities"].items())
            print(f"{p['label']}\t{p['probabilities'][p['label']]:.4f}\t[{probs}]\t{text}")
    elif args.command == "demo":
        variants = None if args.variants is None else args.variants.split(",")
        run_demo(args.out, epochs=args.epochs, variants=variants,
                 train_examples=args.train_examples, progress=not args.no_progress)
    return 0
