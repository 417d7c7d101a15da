"""The command line of the chat task (``lowrank.app.cli`` hands these over, docs/chat.md):

    lowrank finetune --base smollm2 --task chat --data train.jsonl [--eval-data val.jsonl]
                     --variant lora --targets all-linear --out DIR [--metric accuracy]
    lowrank eval --task chat --adapter DIR --data test.jsonl [--metric accuracy]
    lowrank eval --task chat --model smollm2 --data test.jsonl     # the base alone
    lowrank demo --task chat [--out DIR] [--variants lora,dora]

A bad line of a data file prints one line naming file:line, before anything is written.
"""
from __future__ import annotations

import argparse
import sys

from ..adapters import available, field_from_text
from ..backend import threads
from ..nn.optim import ADAMW_FORMS
from ..nn.schedules import SCHEDULES
from ..tasks import chat, chat_io
from ..tasks.chat_data import read_jsonl
from .chat_demo import TRAIN_EXAMPLES, run_demo
from .run_dir import prepare_out
from .run_lock import hold

COMMANDS = ("finetune", "eval", "demo")


def handles(argv) -> bool:
    """Whether ``argv`` is a chat-task command: ``finetune``/``eval``/``demo`` with
    ``--task chat``."""
    if not argv or argv[0] not in COMMANDS:
        return False
    for i, a in enumerate(argv):
        if a == "--task=chat" or (a == "--task" and i + 1 < len(argv) and argv[i + 1] == "chat"):
            return True
    return False


def _common(p) -> None:
    p.add_argument("--task", choices=("chat",), required=True, help="the chat task")
    p.add_argument("--metric", choices=("loss", "accuracy"), default="loss",
                   help="'accuracy' also scores the greedy answer's exact match (slower)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per batch")
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens kept of each conversation (each turn cut is counted)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="longest greedy answer scored by --metric accuracy")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="compute dtype")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank", description="instruction tuning (chat)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="instruction-tune a chat model on JSONL conversations")
    _common(p)
    p.add_argument("--base", required=True, help="'smollm2', a GGUF file or a Llama-family "
                                                 "Hugging Face directory")
    p.add_argument("--data", required=True, help="JSONL: {'messages': [...]} or "
                                                 "{'prompt', 'completion'} a line")
    p.add_argument("--eval-data", default=None, help="JSONL scored after each epoch")
    p.add_argument("--variant", default="lora", help=f"one of {available()}")
    p.add_argument("--out", required=True, help="directory of the adapter and chat.json")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data")
    p.add_argument("--steps", type=int, default=None, help="cap on the optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of linear warm-up")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="linear",
                   help="learning-rate schedule")
    p.add_argument("--adamw", choices=ADAMW_FORMS, default=None,
                   help="AdamW form (default: the variant's official one, else torch)")
    p.add_argument("--loraplus-lr-ratio", type=float, default=None,
                   help="LoRA+: B learns at this multiple of --lr")
    p.add_argument("--r", type=int, default=8, help="adapter rank")
    p.add_argument("--alpha", type=float, default=16.0, help="adapter scale numerator")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout")
    p.add_argument("--targets", default=chat.TARGETS,
                   help="'all-linear' or comma-separated module names (q_proj,v_proj,...)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other field of the variant's config, PEFT names too (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, order and dropout")
    p.add_argument("--save-every", type=int, default=0,
                   help="also save (with the training state) every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--force", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="loss, perplexity (and accuracy) on JSONL conversations")
    _common(p)
    p.add_argument("--data", required=True, help="JSONL conversations to score")
    p.add_argument("--adapter", default=None, help="directory `finetune --task chat` wrote")
    p.add_argument("--model", default=None, help="the base (default: the adapter's own); "
                                                  "alone: score the base zero-shot")

    p = sub.add_parser("demo", help="SmolLM2 on sentiment as a chat: zero-shot, then LoRA")
    p.add_argument("--task", choices=("chat",), required=True, help="the chat demo")
    p.add_argument("--out", default="lowrank-demo-chat", help="output directory")
    p.add_argument("--variants", default="lora", help="comma-separated variants to train")
    p.add_argument("--train-examples", type=int, default=TRAIN_EXAMPLES,
                   help="train on the first N of the 1,800 training sentences")
    p.add_argument("--val-examples", type=int, default=200,
                   help="score the first N of the 200 validation sentences")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=None,
                       help="BLAS threads (default: the command line's one)")
    return parser


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:   # docs/performance.md#threads
        threads.set_threads(threads.check_threads(args.threads))
    else:
        threads.apply_cli_default()
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


def _targets(text):
    return text if text.lower() == chat.TARGETS else [t for t in text.split(",") if t]


def _metrics(m: dict) -> str:
    line = f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}"
    if "accuracy" in m:
        line += f"  accuracy {m['accuracy']:.4f} ({m['correct']}/{m['count']})"
    return line


def run(args) -> int:
    if args.command == "finetune":
        if args.variant not in available():
            raise ValueError(f"unknown variant {args.variant!r}; choose one of {available()}")
        config = chat.ChatConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
            max_length=args.max_length, seed=args.seed, steps=args.steps,
            schedule=args.lr_schedule, adamw=args.adamw,
            loraplus_lr_ratio=args.loraplus_lr_ratio, max_new_tokens=args.max_new_tokens)
        for path in (args.data, args.eval_data):   # file:line before --out is touched
            if path is not None:
                read_jsonl(path)
        out = prepare_out(args.out, resume=args.resume, force=args.force, base=args.base)

        def on_epoch(epoch, row):
            print(f"epoch {epoch}: train loss {row['train_loss']:.4f}"
                  + (f"  val {_metrics({k[4:]: v for k, v in row.items() if k[:4] == 'val_'})}"
                     if "val_loss" in row else ""), flush=True)

        with hold(out) as guard:
            result = chat_io.finetune(
                guard.path, args.base, args.variant, config, args.data, args.eval_data,
                _options(args), _targets(args.targets), args.dtype, args.resume,
                args.save_every, not args.no_progress, on_epoch, args.metric == "accuracy")
        info = result["info"]
        share = 100.0 * info["trainable"] / info["total"]
        print(f"{args.variant}: {info['trainable']:,} trainable parameters ({share:.2f}%); "
              f"{result['tokens_per_s']:,.0f} train tokens/s; saved to {args.out}")
    elif args.command == "eval":
        if args.adapter is None and args.model is None:
            raise ValueError("eval --task chat needs --adapter DIR or --model BASE")
        m = chat_io.evaluate_file(args.data, args.adapter, args.model,
                                  args.metric == "accuracy", args.batch_size, args.max_length,
                                  args.max_new_tokens, args.dtype)
        print(m["cut"])
        print(_metrics(m))
    elif args.command == "demo":
        run_demo(args.out, variants=[v for v in args.variants.split(",") if v],
                 train_examples=args.train_examples, val_examples=args.val_examples,
                 progress=not args.no_progress)
    return 0
