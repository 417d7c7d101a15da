"""The flags of ``--task``: what ``finetune --task classify`` and ``demo --task sentiment``
add to one parser (labelled data, the classification recipe), the defaults that differ by
task, the check that refuses a flag of the other task in one line, and the checked number
types every flag uses.
"""
from __future__ import annotations

import argparse
import math

from ..tasks import data_files


def whole(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def real(low: float = 0.0, below: float | None = None):
    """An argparse type: a finite number >= low (and < below)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (below is not None and value >= below):
            span = f">= {low}" + ("" if below is None else f" and < {below}")
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def data_flags(p, train: bool) -> None:
    """The labelled-data flags (one reader for every format: docs/classification.md#data)."""
    g = p.add_argument_group("labelled data (--task classify)" if train else
                             "a classifier on labelled data (--data)")
    if train:
        g.add_argument("--data", default=None,
                       help="labelled training file: .tsv/.txt, .csv, .jsonl, .parquet, a "
                            "datasets save_to_disk directory (DIR#split), or sentiment:train "
                            "(default: the shipped 1,800 sentiment sentences)")
        g.add_argument("--eval-data", default=None,
                       help="validation file, any format --data takes (default with the "
                            "shipped data: its 200 held out, sentiment:val)")
        g.add_argument("--max-examples", type=whole(1), default=None,
                       help="read at most this many training examples (default: all)")
    else:
        g.add_argument("--data", default=None,
                       help="labelled file to score a classifier on (any format finetune "
                            "--data takes, e.g. sentiment:val); without it, --corpus and "
                            "a language model")
    g.add_argument("--format", choices=data_files.FORMATS, default=None,
                   help="the data's format (default: from the extension)")
    g.add_argument("--text-column", default=None,
                   help="the text's column (a header name, or a 0-based position without "
                        "one; default: the first of text, sentence, content, ...)")
    g.add_argument("--label-column", default=None,
                   help="the label's column (default: the first of label, labels, class, ...)")
    g.add_argument("--label-names", default=None, metavar="NAME,NAME,...",
                   help="names of the integer labels 0, 1, ... (e.g. negative,positive)")
    g.add_argument("--header", choices=("auto", "yes", "no"), default="auto",
                   help="whether a TSV/CSV file's first row names its columns ('auto': when "
                        "its cells are names like text, label)")


def classify_flags(p) -> None:
    g = p.add_argument_group("classification (--task classify; --epochs and --max-length "
                             "also --task chat)")
    g.add_argument("--epochs", type=whole(1), default=None,
                   help="passes over the training data (default: 3; 1 with --task chat)")
    g.add_argument("--max-length", type=whole(2, 1 << 16), default=None,
                   help="tokens per text, [CLS] and [SEP] included (default: 64; with "
                        "--task chat 512 tokens of each conversation, each cut counted)")
    g.add_argument("--pooling", choices=("mean", "cls"), default=None,
                   help="the head reads the mean of the tokens or the [CLS] pooler "
                        "(default: mean)")
    g.add_argument("--model-dropout", type=real(0.0, 1.0), default=None,
                   help="the encoder's hidden and attention dropout (default: 0.1)")


def chat_flags(p, train: bool = True) -> None:
    """The flags of ``--task chat`` (docs/chat.md) that no other task has."""
    g = p.add_argument_group("chat (--task chat)")
    g.add_argument("--metric", choices=("loss", "accuracy"), default="loss",
                   help="'accuracy' also scores the exact match of the greedy answer (slower)")
    g.add_argument("--max-new-tokens", type=whole(1, 1 << 16), default=32,
                   help="longest greedy answer --metric accuracy scores")
    if train:
        g.add_argument("--warmup-ratio", type=real(0.0, 1.0), default=0.1,
                       help="share of the steps spent in linear warm-up from 0")
    else:
        g.add_argument("--max-length", type=whole(2, 1 << 16), default=512,
                       help="tokens kept of each conversation (each cut counted)")


CHAT_ONLY = ("--metric", "--max-new-tokens", "--warmup-ratio")
DEMO_CHAT_ONLY = ("--quantize", "--shards")
# flags of one task only: (command, task) -> flags that belong to the other task
_ONLY = {
    "classify": ("--epochs", "--max-length", "--pooling", "--model-dropout", "--data",
                 "--eval-data", "--max-examples", "--format", "--text-column",
                 "--label-column", "--label-names", "--header"),
    "lm": ("--steps", "--warmup", "--accum-steps", "--grad-clip", "--eval-interval",
           "--backend", "--resume", "--force", "--save-every", "--corpus", "--max-bytes",
           "--comm", "--quantize", "--loraplus-lr-ratio", "--regex", "--init", "--rslora"),
    "sentiment": ("--epochs", "--train-examples", "--variants", "--val-examples"),
    "chat": ("--pooling", "--model-dropout", "--max-examples", "--format", "--text-column",
             "--label-column", "--label-names", "--header", "--warmup", "--accum-steps",
             "--grad-clip", "--eval-interval", "--backend", "--corpus", "--max-bytes", "--comm",
             "--regex", "--init", "--rslora", "--save-format"),
    "demo-lm": ("--pretrain-steps", "--steps", "--backend", "--dtype", "--seed"),
}
_DEFAULTS = {"lm": {"batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "dropout": 0.0,
                    "targets": "q,k,v,o,fc1,fc2"},
             "classify": {"batch_size": 32, "weight_decay": 0.01, "dropout": 0.1,
                          "epochs": 3, "max_length": 64, "pooling": "mean",
                          "model_dropout": 0.1, "dtype": "float32"},
             "chat": {"batch_size": 8, "lr": 2e-4, "weight_decay": 0.0, "dropout": 0.05,
                      "targets": "all-linear", "epochs": 1, "max_length": 512,
                      "dtype": "float32", "lr_schedule": "linear"}}


def _given(argv, flag) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def check_task(sub, argv, args) -> None:
    """Refuse a flag of the other task (one line naming the flag and the task it needs)."""
    task = getattr(args, "task", None)
    if task == "chat":
        refused = _ONLY["chat"] if args.command == "finetune" else \
            ("--corpus", "--max-bytes", "--batches", "--json") if args.command == "eval" else \
            _ONLY["demo-lm"] + ("--epochs",)
        for flag in refused:
            if _given(argv, flag):
                sub.error(f"{flag} does not apply to --task chat")
        if args.command == "eval" and args.model is None and args.adapter is None:
            sub.error("eval --task chat needs --adapter DIR or --model BASE")
        if args.command in ("finetune", "eval") and args.data is None:
            sub.error("--task chat needs --data FILE.jsonl")
        return
    if args.command in ("finetune", "demo"):
        for flag in CHAT_ONLY if args.command == "finetune" else DEMO_CHAT_ONLY:
            if _given(argv, flag):
                sub.error(f"{flag} needs --task chat")
    if args.command == "eval" and args.model is None:
        sub.error("the following arguments are required: --model")
    if args.command in ("eval", "generate") and getattr(args, "data", None) is None:
        for flag in _ONLY["classify"][-5:]:          # the data flags
            if _given(argv, flag):
                sub.error(f"{flag} describes a labelled file: give it with --data")
        if args.model == "minilm":
            sub.error("minilm is an encoder, not a language model: score a classifier "
                      "with eval --data FILE --adapter DIR")
        return
    if args.command == "finetune":
        wrong, needs = (("classify", "--task classify") if args.task == "lm" else
                        ("lm", "--task lm"))
    elif args.command == "demo":
        wrong, needs = (("sentiment", "--task sentiment") if args.task == "lm" else
                        ("demo-lm", "--task lm"))
    else:
        return
    for flag in _ONLY[wrong]:
        if _given(argv, flag):
            hint = " (classification trains for --epochs)" if flag == "--steps" else ""
            sub.error(f"{flag} needs {needs}{hint}")
    if args.command == "finetune" and args.task == "lm" and args.base == "minilm":
        sub.error("minilm is an encoder for labelled text: add --task classify "
                  "(and --data FILE, or the shipped sentiment data)")


def fill_defaults(args) -> None:
    if args.command == "finetune":
        defaults = {**_DEFAULTS[args.task], **({"steps": 200} if args.task == "lm" else {})}
        for key, value in defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    elif args.command == "eval" and args.task == "chat":
        args.batch_size = args.batch_size or 8
        args.dtype = args.dtype or "float32"
    elif args.command == "eval" and args.batch_size is None:
        args.batch_size = 32 if args.data is not None else 16
    elif args.command == "demo":
        if args.out is None:
            args.out = {"lm": "lowrank-demo", "sentiment": "lowrank-demo-sentiment",
                        "chat": "lowrank-demo-chat"}[args.task]
        if args.train_examples is None:
            args.train_examples = 256 if args.task == "chat" else 1800
        if args.variants is None and args.task == "chat":
            args.variants = "lora"


def data_options(args) -> dict:
    """``data_files.read_examples``'s keyword arguments from the labelled-data flags."""
    names = getattr(args, "label_names", None)
    return {"format": args.format, "text_column": args.text_column,
            "label_column": args.label_column,
            "label_names": None if names is None else [n for n in names.split(",") if n],
            "header": {"auto": None, "yes": True, "no": False}[args.header]}
