"""The ``lowrank`` command line's arguments: every flag with its help and default, every field
of the chosen adapter variant as a flag of its own (``lowrank finetune --variant adalora --help``
lists AdaLoRA's), values checked as they are parsed, and a misspelt flag answered with the
nearest one (``--stesp``: did you mean ``--steps``?). Errors are one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys

from ..adapters import available, config as adapter_config, field_from_text
from ..nn.optim import ADAMW_FORMS
from ..nn.schedules import SCHEDULES

BACKENDS = ("numpy", "numpy-strict", "cupy")
VARIANT_FLAGS = {"r", "alpha", "dropout", "init", "rslora"}   # fields with their own flag


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


class Parser(argparse.ArgumentParser):
    """One-line errors, with the nearest flag for an unknown one."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unknown(self, extra: list) -> None:
        flags = [s for a in self._actions for s in a.option_strings]
        token = extra[0]
        if not token.startswith("-"):
            self.error(f"unexpected argument {token!r}")
        near = difflib.get_close_matches(token.split("=")[0], flags, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else ""
        self.error(f"unrecognized argument {token}{hint}")


def _sub(sub, name, text):
    return sub.add_parser(name, help=text, description=text,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _common(p, steps, lr, out=None):
    p.add_argument("--steps", type=whole(1), default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=whole(1), default=16, help="rows per step (global)")
    p.add_argument("--lr", type=real(), default=lr, help="peak learning rate")
    p.add_argument("--warmup", type=whole(0), default=10, help="linear warm-up steps")
    p.add_argument("--accum-steps", type=whole(1), default=1, help="gradient accumulation")
    p.add_argument("--shards", type=whole(1, 256), default=1,
                   help="split each batch's rows over this many threads, one BLAS thread "
                        "each (NumPy; try the core count; docs/performance.md#batch-shards)")
    p.add_argument("--weight-decay", type=real(), default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=real(), default=1.0, help="max global grad norm (0: off)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule (default: the variant's official one, else "
                        "lowrank_cosine; docs/training.md#schedules)")
    p.add_argument("--adamw", choices=ADAMW_FORMS, default=None,
                   help="AdamW form: torch's or Hugging Face's (default: the variant's "
                        "official one, else torch)")
    p.add_argument("--eval-interval", type=whole(0), default=0,
                   help="print the validation loss every N steps (0: at the end only)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="parameter dtype (default: float32, or the base model's)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="array backend (default: LOWRANK_BACKEND or numpy)")
    p.add_argument("--out", default=out, required=out is None, help="output directory")
    p.add_argument("--seed", type=whole(0), default=0, help="seed of init, batches, dropout")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace a run already in --out (otherwise refused)")
    p.add_argument("--save-every", type=whole(0), default=0,
                   help="checkpoint interval in steps (0: at the end only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="'docs', 'code', or text files to train on")
    p.add_argument("--max-bytes", type=whole(1), default=1_500_000, help="corpus bytes to read")
    p.add_argument("--comm", choices=("auto", "none", "mpi", "nccl"), default="auto",
                   help="data parallel over processes: 'auto' uses MPI (NCCL with cupy) "
                        "when started by mpiexec with several processes; --batch-size is "
                        "the global batch, split between them")


def _variant_fields(p, variants) -> None:
    """Every config field of ``variants`` as ``--field-name VALUE`` (dest ``field:<name>``)."""
    seen = set(VARIANT_FLAGS)
    for variant in variants:
        cfg = adapter_config(variant)
        own = [f for f in dataclasses.fields(cfg) if f.name not in ("r", "alpha", "dropout")]
        shared = [f.name for f in own if f.name in seen]
        group = p.add_argument_group(
            f"{variant} fields", "(also " + ", ".join(shared) + ", see above)" if shared else None)
        for f in own:
            if f.name in seen:
                continue
            seen.add(f.name)
            default = getattr(cfg, f.name)
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"field:{f.name}",
                               nargs="?", const="true", default=argparse.SUPPRESS,
                               metavar=type(default).__name__.upper()
                               if default is not None else "VALUE",
                               help=f"{variant} config field (default: {default!r})")


def chosen_variants(argv) -> list[str]:
    """The variants ``--variant`` names in ``argv`` (all registered ones if it names none)."""
    for i, token in enumerate(argv):
        value = None
        if token == "--variant" and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith("--variant="):
            value = token.split("=", 1)[1]
        if value is not None:
            names = [v.split(":")[0] for v in value.split(",") if v]
            known = [v for v in names if v in available()]
            return known or available()
    return available()


def build_parser(argv=()) -> Parser:
    parser = Parser(prog="lowrank", description="lowrank: LoRA and its variants in NumPy/CuPy")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = _sub(sub, "pretrain", "train a small GPT from scratch (BPE tokenizer included)")
    _common(p, steps=300, lr=3e-3)
    p.add_argument("--vocab-size", type=whole(2, 1 << 20), default=1024, help="BPE vocabulary")
    p.add_argument("--context", type=whole(1, 1 << 14), default=64, help="tokens per row")
    p.add_argument("--n-layer", type=whole(1, 256), default=2, help="transformer blocks")
    p.add_argument("--n-head", type=whole(1, 1024), default=4, help="attention heads")
    p.add_argument("--d-model", type=whole(1, 1 << 14), default=128, help="model width")
    p.add_argument("--untied", action="store_true", help="separate lm_head weight")

    p = _sub(sub, "finetune", "adapt a base model: full fine-tuning or an adapter")
    _common(p, steps=200, lr=3e-3)
    p.add_argument("--base", required=True,
                   help="directory written by `lowrank pretrain`, or a Hugging Face GPT-2 one")
    p.add_argument("--variant", default="lora",
                   help=f"'full' or one of {available()}; a comma-separated list trains "
                        "several adapters together over one base into <out>/<variant> "
                        "(per-adapter fields: lora,lora:r=4:lr=1e-3)")
    p.add_argument("--targets", default="q,k,v,o,fc1,fc2",
                   help="comma-separated module name suffixes, or a regex with --regex")
    p.add_argument("--regex", action="store_true", help="--targets is one full-match regex")
    p.add_argument("--r", type=whole(1), default=8, help="adapter rank")
    p.add_argument("--alpha", type=real(), default=16.0, help="scale: alpha / r")
    p.add_argument("--dropout", type=real(0.0, 1.0), default=0.0, help="adapter input dropout")
    p.add_argument("--init", default=None,
                   help="LoRA init: kaiming, gaussian, pissa, ... (None: the variant's own)")
    p.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r)")
    p.add_argument("--quantize", choices=("nf4",), default=None,
                   help="QLoRA: store the frozen base as 4-bit NormalFloat under the adapter")
    p.add_argument("--loraplus-lr-ratio", type=real(0.0), default=None,
                   help="LoRA+: lora_B (and 1-D adapter parameters) learn at this x --lr "
                        "(PEFT's loraplus_lr_ratio; the paper suggests 16)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="--resume on a base whose weights differ from the ones run.json records")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any field of the variant's config (repeatable), like its own flag")
    p.add_argument("--save-format", choices=("lowrank", "peft"), default="lowrank",
                   help="peft: also write the final adapter to <out>/peft in PEFT's format "
                        "(PeftModel.from_pretrained reads it)")
    _variant_fields(p, chosen_variants(argv))

    for name, text in (("generate", "sample text from a model (and adapter)"),
                       ("eval", "validation loss of a model (and adapter) on a corpus")):
        p = _sub(sub, name, text)
        p.add_argument("--model", required=True,
                       help="base model directory, or a fine-tuned one (its base is found "
                            "from its run.json)")
        p.add_argument("--adapter", default=None, help="fine-tuned directory to apply")
        p.add_argument("--allow-other-base", action="store_true",
                       help="apply an adapter to a base whose weights differ from the ones "
                            "it was trained on")
        p.add_argument("--backend", choices=BACKENDS, default=None, help="array backend")
        p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                       help="compute dtype (default: the model's)")
        p.add_argument("--seed", type=whole(0), default=0, help="sampling seed")
        if name == "generate":
            p.add_argument("--prompt", default="", help="text to continue")
            p.add_argument("--max-new-tokens", type=whole(0, 1 << 20), default=100,
                           help="tokens to sample")
            p.add_argument("--temperature", type=real(), default=0.8,
                           help="softmax temperature (0: greedy)")
            p.add_argument("--top-k", type=whole(0), default=40, help="0: no top-k cut")
        else:
            p.add_argument("--corpus", nargs="+", default=["code"],
                           help="'docs', 'code', or text files")
            p.add_argument("--max-bytes", type=whole(1), default=1_500_000,
                           help="corpus bytes to read")
            p.add_argument("--batches", type=whole(1), default=16, help="batches to score")
            p.add_argument("--batch-size", type=whole(1), default=16, help="rows per batch")

    _sub(sub, "chat", "talk with a chat model (lowrank chat --model smollm2 --help)")
    p = _sub(sub, "demo", "pretrain on Python's docs, adapt to its source with every variant, "
                          "print the comparison and plot the loss curves")
    p.add_argument("--out", default="lowrank-demo", help="output directory")
    p.add_argument("--pretrain-steps", type=whole(1), default=600, help="base model steps")
    p.add_argument("--steps", type=whole(1), default=200, help="fine-tuning steps per variant")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="array backend")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dtype")
    p.add_argument("--seed", type=whole(0), default=0, help="seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = _sub(sub, "bench", "training throughput: full fine-tuning vs LoRA (the PyTorch+PEFT "
                           "baseline: benchmarks/bench_train.py)")
    p.add_argument("--steps", type=whole(1), default=10, help="timed steps")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="array backend")
    for p in sub.choices.values():   # docs/performance.md#threads
        p.add_argument("--threads", type=whole(1, 4096), default=None,
                       help="BLAS/OpenMP threads (default: the library's own; under mpiexec, "
                            "cores / ranks)")
    return parser


def parse(argv=None):
    """``(parser, args)``; ``args.variant_options``: the variant fields given as flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser._subparsers._group_actions[0].choices[args.command]
        sub.unknown(extra)
    args.variant_options = dict(field_from_text(k.split(":", 1)[1], v)
                                for k, v in vars(args).items() if k.startswith("field:"))
    return parser, args
