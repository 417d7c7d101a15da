"""The ``lowrank`` command line's arguments: every flag with its help and default, every field
of the chosen adapter variant as a flag of its own (``lowrank finetune --variant adalora --help``
lists AdaLoRA's), values checked as they are parsed, and a misspelt flag answered with the
nearest one (``--stesp``: did you mean ``--steps``?). Errors are one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys

from ..adapters import available, config as adapter_config, field_from_text
from ..nn.optim import ADAMW_FORMS
from ..nn.schedules import SCHEDULES
from .export import add_arguments as export_arguments
from .cli_task_flags import (chat_flags, check_task, classify_flags, data_flags, fill_defaults,
                             real, whole)

BACKENDS = ("numpy", "numpy-strict", "cupy")
VARIANT_FLAGS = {"r", "alpha", "dropout", "init", "rslora"}   # fields with their own flag


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once: appended unless the help already says it (or there is none
    to say: a switch, an unset value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _sub(sub, name, text):
    return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)


def _common(p, steps, lr, out=None, task_defaults=False):
    """The training flags; ``task_defaults``: the defaults that differ between
    ``--task lm`` and ``--task classify`` are left unset here and filled in by ``parse``."""
    lm = p.add_argument_group("language model (--task lm)") if task_defaults else p
    lm.add_argument("--steps", type=whole(1), default=None if task_defaults else steps,
                    help="optimizer steps" + (f" (default: {steps}); with --task chat a cap "
                                              "on the epochs' steps" if task_defaults else ""))
    p.add_argument("--batch-size", type=whole(1), default=None if task_defaults else 16,
                   help="rows per step (global)"
                        + (" (default: 16; 32 with --task classify)" if task_defaults else ""))
    p.add_argument("--lr", type=real(), default=None if task_defaults else lr,
                   help="peak learning rate" + (f" (default: {lr:g}; with --task classify "
                        "5e-4 for adapters, 5e-5 full, 1e-3 head)" if task_defaults else ""))
    lm.add_argument("--warmup", type=whole(0), default=10,
                    help="linear warm-up steps (--task classify: 10%% of the steps)")
    lm.add_argument("--accum-steps", type=whole(1), default=1, help="gradient accumulation")
    p.add_argument("--shards", type=whole(1, 256), default=1,
                   help="split each batch's rows over this many threads, one BLAS thread "
                        "each (NumPy; try the core count; docs/performance.md#batch-shards)")
    p.add_argument("--weight-decay", type=real(), default=None if task_defaults else 0.0,
                   help="AdamW weight decay" + (" (default: 0; 0.01 with --task classify)"
                                                if task_defaults else ""))
    lm.add_argument("--grad-clip", type=real(), default=1.0, help="max global grad norm (0: off)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule (default: the variant's official one, else "
                        "lowrank_cosine; linear with --task classify; docs/training.md#schedules)")
    p.add_argument("--adamw", choices=ADAMW_FORMS, default=None,
                   help="AdamW form: torch's or Hugging Face's (default: the variant's "
                        "official one, else torch)")
    lm.add_argument("--eval-interval", type=whole(0), default=0,
                    help="print the validation loss every N steps (0: at the end only)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="parameter dtype (default: float32, or the base model's)")
    lm.add_argument("--backend", choices=BACKENDS, default=None,
                    help="array backend (default: LOWRANK_BACKEND or numpy)")
    p.add_argument("--out", default=out, required=out is None, help="output directory")
    p.add_argument("--seed", type=whole(0), default=0,
                   help="seed of the initialization, batch order and dropout")
    lm.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    lm.add_argument("--force", action="store_true",
                    help="replace a run already in --out (otherwise refused)")
    lm.add_argument("--save-every", type=whole(0), default=0,
                    help="checkpoint interval in steps (0: at the end only)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none when the output is not a terminal: "
                        "a line per epoch or validation instead)")
    p.add_argument("--json", action="store_true",
                   help="end with one JSON line: the run's record (other lines go to stderr)")
    lm.add_argument("--corpus", nargs="+", default=None,
                    help="'docs', 'code', or text files to train on (default: "
                         + ("'code')" if task_defaults else "'docs')"))
    lm.add_argument("--max-bytes", type=whole(1), default=1_500_000, help="corpus bytes to read")
    lm.add_argument("--comm", choices=("auto", "none", "mpi", "nccl"), default="auto",
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
                               help=f"{variant} config field (default: "
                                    f"{'not set' if default is None else repr(default)})")


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
    parser = Parser(prog="lowrank", formatter_class=HelpFormatter,
                    description="lowrank: LoRA and its variants in NumPy/CuPy; "
                                "`lowrank COMMAND --help` lists a command's flags")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="COMMAND")

    p = _sub(sub, "pretrain", "train a small GPT from scratch (BPE tokenizer included)")
    _common(p, steps=300, lr=3e-3)
    p.add_argument("--vocab-size", type=whole(2, 1 << 20), default=1024, help="BPE vocabulary")
    p.add_argument("--context", type=whole(1, 1 << 14), default=64, help="tokens per row")
    p.add_argument("--n-layer", type=whole(1, 256), default=2, help="transformer blocks")
    p.add_argument("--n-head", type=whole(1, 1024), default=4, help="attention heads")
    p.add_argument("--d-model", type=whole(1, 1 << 14), default=128, help="model width")
    p.add_argument("--untied", action="store_true", help="separate lm_head weight")

    p = _sub(sub, "finetune", "adapt a base model with an adapter (or fully): a language "
                              "model on a corpus, or a BERT encoder on labelled text "
                              "(--task classify)")
    p.add_argument("--task", choices=("lm", "classify", "chat"), default="lm",
                   help="'lm': next-token loss on a corpus (GPT bases); 'classify': labels "
                        "from text (BERT bases such as minilm; --data); 'chat': JSONL "
                        "conversations, loss on the answers (`finetune --task chat --help`)")
    _common(p, steps=200, lr=3e-3, task_defaults=True)
    p.add_argument("--base", required=True,
                   help="directory written by `lowrank pretrain`, a Hugging Face GPT-2 or "
                        "BERT one, or 'minilm' (with --task classify)")
    p.add_argument("--variant", default="lora",
                   help=f"'full' or one of {available()} ('head' too with --task classify); "
                        "a comma-separated list trains several adapters together over one "
                        "base into <out>/<variant> (per-adapter fields: lora,lora:r=4:lr=1e-3)")
    p.add_argument("--targets", default=None,
                   help="comma-separated module name suffixes, or a regex with --regex "
                        "(default: q,k,v,o,fc1,fc2; with --task classify the six linears of "
                        "each BERT layer)")
    p.add_argument("--regex", action="store_true", help="--targets is one full-match regex")
    p.add_argument("--r", type=whole(1), default=8, help="adapter rank")
    p.add_argument("--alpha", type=real(), default=16.0, help="scale: alpha / r")
    p.add_argument("--dropout", type=real(0.0, 1.0), default=None,
                   help="adapter input dropout (default: 0; 0.1 with --task classify)")
    p.add_argument("--init", default=None,
                   help="LoRA init: kaiming, gaussian, pissa, ... (default: the variant's own)")
    p.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r)")
    p.add_argument("--quantize", choices=("nf4", "keep"), default=None,
                   help="QLoRA: nf4 stores the frozen base as 4-bit NormalFloat under the "
                        "adapter; keep leaves a GGUF base in its own blocks (docs/gguf.md)")
    p.add_argument("--loraplus-lr-ratio", type=real(0.0), default=None,
                   help="LoRA+: lora_B (and 1-D adapter parameters) learn at this x --lr "
                        "(PEFT's loraplus_lr_ratio; the paper suggests 16)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any field of the variant's config (repeatable), like its own flag")
    p.add_argument("--allow-other-base", action="store_true",
                   help="--resume on a base whose weights differ from the ones run.json records")
    p.add_argument("--save-format", choices=("lowrank", "peft"), default="lowrank",
                   help="peft: also write the final adapter to <out>/peft in PEFT's format "
                        "(PeftModel.from_pretrained reads it)")
    classify_flags(p)
    chat_flags(p)
    data_flags(p, train=True)
    _variant_fields(p, chosen_variants(argv))

    for name, text in (("generate", "sample text from a model (and adapter)"),
                       ("eval", "validation loss of a language model on a corpus, "
                                "accuracy of a classifier on a labelled file (--data), or "
                                "loss and accuracy of a chat model (--task chat)")):
        p = _sub(sub, name, text)
        p.add_argument("--model", required=name == "generate",
                       help="base model directory ('minilm' for a classifier), or a "
                            "fine-tuned one (its base is found from its run.json); with "
                            "--task chat the adapter's own base by default")
        p.add_argument("--adapter", default=None,
                       help="fine-tuned directory to apply (a classifier's with --data)")
        p.add_argument("--allow-other-base", action="store_true",
                       help="apply an adapter to a base whose weights differ from the ones "
                            "it was trained on")
        p.add_argument("--backend", choices=BACKENDS, default=None,
                       help="array backend (default: LOWRANK_BACKEND or numpy)")
        p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                       help="compute dtype (default: the model's)")
        if name == "generate":
            p.add_argument("--seed", type=whole(0), default=0, help="sampling seed")
            p.add_argument("--prompt", default="", help="text to continue")
            p.add_argument("--chat", default=None, metavar="MESSAGE",
                           help="a user message, answered through the model's chat template "
                                "(Llama-family models: a GGUF file, 'smollm2', ...)")
            p.add_argument("--system", default=None, help="a system message opening the chat")
            p.add_argument("--max-new-tokens", type=whole(0, 1 << 20), default=100,
                           help="tokens to sample")
            _sampling(p)
        else:
            p.add_argument("--corpus", nargs="+", default=["code"],
                           help="'docs', 'code', or text files")
            p.add_argument("--max-bytes", type=whole(1), default=1_500_000,
                           help="corpus bytes to read")
            p.add_argument("--batches", type=whole(1), default=16, help="batches to score")
            p.add_argument("--batch-size", type=whole(1), default=None,
                           help="rows per batch (default: 16; 32 with --data)")
            p.add_argument("--json", action="store_true", help="print the result as JSON")
            p.add_argument("--task", choices=("lm", "classify", "chat"), default=None,
                           help="what is scored (default: classify with --data, else lm)")
            chat_flags(p, train=False)
            data_flags(p, train=False)

    p = _sub(sub, "predict", "label and probabilities of each text, from a classifier "
                             "`finetune --task classify` wrote")
    p.add_argument("--model", required=True, help="the classifier's base: a BERT directory "
                                                  "or 'minilm'")
    p.add_argument("--adapter", required=True, help="directory `finetune --task classify` wrote")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per text instead of tab-separated lines")
    p.add_argument("texts", nargs="+", help="texts to label")

    p = _sub(sub, "chat", "talk with a chat model (a GGUF file, 'smollm2', a Llama-family "
                          "directory): one user message per line of stdin, the conversation "
                          "kept in the model's chat template (docs/gguf.md#chat)")
    p.add_argument("--model", required=True,
                   help="a GGUF file, 'smollm2', or a Hugging Face Llama-family directory")
    p.add_argument("--adapter", default=None,
                   help="adapter directory to apply (PEFT's format or lowrank's)")
    p.add_argument("--system", default=None, help="a system message opening the chat")
    p.add_argument("--max-new-tokens", type=whole(0, 1 << 20), default=256,
                   help="tokens per answer at most")
    p.add_argument("--seed", type=whole(0), default=0, help="sampling seed")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="array backend (default: LOWRANK_BACKEND or numpy)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="compute dtype")
    _sampling(p)

    export_arguments(_sub(sub, "export", "a fine-tuned model out as a Hugging Face directory, "
                                         "a GGUF file, or a PEFT adapter (docs/export.md)"))

    p = _sub(sub, "demo", "pretrain on Python's docs, adapt to its source with every variant, "
                          "print the comparison and plot the loss curves (--task sentiment: "
                          "MiniLM on the shipped sentiment data)")
    p.add_argument("--task", choices=("lm", "sentiment", "chat"), default="lm",
                   help="'lm': the GPT demo; 'sentiment': head, full and every variant on "
                        "MiniLM; 'chat': SmolLM2 answering sentiment questions, zero-shot "
                        "then LoRA (`demo --task chat --help`)")
    p.add_argument("--out", default=None,
                   help="output directory (default: lowrank-demo, lowrank-demo-sentiment or "
                        "lowrank-demo-chat)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("language model (--task lm)")
    g.add_argument("--pretrain-steps", type=whole(1), default=600, help="base model steps")
    g.add_argument("--steps", type=whole(1), default=200, help="fine-tuning steps per variant")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="array backend (default: LOWRANK_BACKEND or numpy)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="parameter dtype")
    g.add_argument("--seed", type=whole(0), default=0,
                   help="seed of the initialization, batch order and dropout")
    g = p.add_argument_group("sentiment and chat (--task sentiment, --task chat)")
    g.add_argument("--epochs", type=whole(1), default=1, help="epochs per row (sentiment)")
    g.add_argument("--train-examples", type=whole(1), default=None,
                   help="train on the first N of the 1,800 training sentences (default: "
                        "all; 256 with --task chat)")
    g.add_argument("--val-examples", type=whole(1), default=200,
                   help="score the first N of the 200 validation sentences (--task chat)")
    g.add_argument("--variants", default=None,
                   help="comma-separated rows to train: head, full, variants (default: all; "
                        "lora with --task chat)")
    g.add_argument("--quantize", choices=("nf4", "keep"), default=None,
                   help="--task chat: train the rows over the base kept in the GGUF's own "
                        "blocks (keep) or in 4-bit NormalFloat (nf4)")
    g.add_argument("--shards", type=whole(1, 256), default=None,
                   help="--task chat: split each batch's rows over this many threads, one "
                        "BLAS thread each (default: the usable cores)")

    p = _sub(sub, "bench", "training throughput: full fine-tuning vs LoRA (the PyTorch+PEFT "
                           "baseline: benchmarks/bench_train.py)")
    p.add_argument("--steps", type=whole(1), default=10, help="timed steps")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="array backend (default: LOWRANK_BACKEND or numpy)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    for p in sub.choices.values():   # docs/performance.md#threads
        p.add_argument("--threads", type=whole(1, 4096), default=None,
                       help="BLAS/OpenMP threads (default: 1, or OMP_NUM_THREADS / "
                            "OPENBLAS_NUM_THREADS when set; more cores: --shards, "
                            "docs/performance.md#shared-machines)")
    return parser


def _sampling(p) -> None:
    p.add_argument("--temperature", type=real(), default=None,
                   help="softmax temperature, 0: greedy (default: 0.8; 0 for a chat answer)")
    p.add_argument("--top-k", type=whole(0), default=None,
                   help="sample among the k likeliest, 0: no cut (default: 40; none for a "
                        "chat answer)")
    p.add_argument("--top-p", type=real(0.0, 1.0), default=None,
                   help="nucleus sampling: the likeliest tokens holding this probability "
                        "(Llama-family models)")


def _set_options(sub, items) -> dict:
    """``--set key=value`` items as config fields (parsed here, once)."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            sub.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            key, options[key] = field_from_text(key, value)
        except ValueError as exc:
            sub.error(f"--set {item}: {exc}")
    return options


def parse(argv=None):
    """``(parser, args)``: the defaults of the chosen ``--task`` filled in, a flag of the other
    task refused; ``args.variant_options``: the variant fields given as flags or ``--set``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    if extra:
        sub.unknown(extra)
    check_task(sub, argv, args)
    fill_defaults(args)
    flags = dict(field_from_text(k.split(":", 1)[1], v)
                 for k, v in vars(args).items() if k.startswith("field:"))
    # a variant's own flag wins over the same field in --set
    args.variant_options = {**_set_options(sub, getattr(args, "set", None)), **flags}
    return parser, args
