"""``lowrank`` command line: pretrain, finetune, generate, eval, demo, bench.

    lowrank pretrain --out base --steps 300
    lowrank finetune --base base --variant lora --targets q,v --r 8 --alpha 16 --out lora
    lowrank generate --model base --adapter lora --prompt "def "
    lowrank demo
    mpiexec -n 2 lowrank finetune --base base --out lora   # data parallel, auto-detected
"""
from __future__ import annotations

import argparse
import sys

from .parallel import ParameterDriftError
from .tasks import classify_cli
from .train import NonFiniteLossError, TrainConfig


def _common(parser, steps, lr, out=None):
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-interval", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="default: float32 (or the base model's)")
    parser.add_argument("--backend", choices=("numpy", "numpy-strict", "cupy"), default=None,
                        help="array backend (default: LOWRANK_BACKEND or numpy)")
    parser.add_argument("--out", default=out, required=out is None, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint interval (steps)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--corpus", nargs="+", default=None,
                        help="'docs', 'code', or text files to train on")
    parser.add_argument("--max-bytes", type=int, default=1_500_000)
    parser.add_argument("--comm", choices=("auto", "none", "mpi", "nccl"), default="auto",
                        help="data parallel over processes: 'auto' uses MPI (NCCL with cupy) "
                             "when started by mpiexec with several processes; --batch-size is "
                             "the global batch, split between them")


def _train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       min_lr=args.lr / 10, warmup=min(args.warmup, args.steps),
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       accum_steps=args.accum_steps, eval_interval=args.eval_interval,
                       seed=args.seed)


def _corpus(values, default):
    if not values:
        return default
    return values[0] if len(values) == 1 and values[0] in ("docs", "code") else list(values)


def _parse_set(items) -> dict:
    """``--set key=value`` for variant options not named on the command line."""
    from .adapters import field_from_text
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, options[key] = field_from_text(key, value)
    return options


def build_parser() -> argparse.ArgumentParser:
    from .adapters import available
    parser = argparse.ArgumentParser(prog="lowrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a small GPT from scratch (BPE tokenizer included)")
    _common(p, steps=300, lr=3e-3)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--untied", action="store_true", help="separate lm_head weight")

    p = sub.add_parser("finetune", help="adapt a base model: full fine-tuning or an adapter")
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
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--init", default=None, help="LoRA init: kaiming, gaussian, pissa, ...")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other field of the variant's config (repeatable); a field can "
                        "also be given as its own flag, e.g. --init-r 12 --target-r 4")

    for name, text in (("generate", "sample text from a model (and adapter)"),
                       ("eval", "validation loss of a model (and adapter) on a corpus")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="base model directory")
        p.add_argument("--adapter", default=None, help="fine-tuned directory to apply")
        p.add_argument("--backend", choices=("numpy", "numpy-strict", "cupy"), default=None)
        p.add_argument("--dtype", choices=("float32", "float64"), default=None)
        p.add_argument("--seed", type=int, default=0)
        if name == "generate":
            p.add_argument("--prompt", default="")
            p.add_argument("--max-new-tokens", type=int, default=100)
            p.add_argument("--temperature", type=float, default=0.8)
            p.add_argument("--top-k", type=int, default=40)
        else:
            p.add_argument("--corpus", nargs="+", default=["code"])
            p.add_argument("--max-bytes", type=int, default=1_500_000)
            p.add_argument("--batches", type=int, default=16)
            p.add_argument("--batch-size", type=int, default=16)

    p = sub.add_parser("demo", help="pretrain on Python's docs, adapt to its source with every "
                                    "variant, print the comparison and plot the loss curves")
    p.add_argument("--out", default="lowrank-demo")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per variant")
    p.add_argument("--backend", choices=("numpy", "numpy-strict", "cupy"), default=None)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("bench", help="training throughput: full fine-tuning vs LoRA (and "
                                     "PyTorch+PEFT when installed)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backend", choices=("numpy", "numpy-strict", "cupy"), default=None)
    return parser


def _variant_options(extra) -> dict:
    """Unlisted ``--field value`` pairs after ``finetune``: any field of the variant's config
    (``--init-r 12 --target-r 4`` for AdaLoRA); a bare ``--flag`` means True."""
    from .adapters import field_from_text
    options, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value, i = extra[i + 1], i + 1
            else:
                value = "true"
        field, options[field] = field_from_text(key, value)
        i += 1
    return options


def main(argv=None) -> int:
    from . import backend
    backend.keep_freed_host_memory()   # training reuses the same large blocks every step
    argv = sys.argv[1:] if argv is None else list(argv)
    if classify_cli.handles(argv):     # --task classify, eval --data, predict, demo --task
        return classify_cli.main(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "finetune":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.comm_obj = None
    try:
        args.variant_options = _variant_options(extra) if extra else {}
        return _run(args)
    except (NonFiniteLossError, ParameterDriftError) as exc:
        return _fail(args, f"lowrank: {exc}", 1)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(args, f"lowrank {args.command}: error: {exc}", 2)


def _fail(args, message: str, code: int) -> int:
    """Print the error; in a parallel run stop every rank (the others would otherwise wait
    for this one in their next collective)."""
    comm = args.comm_obj
    if comm is not None and comm.size > 1:
        comm.abort(message, code)
    print(message, file=sys.stderr)
    return code


def _make_comm(args):
    """The communicator of a training command, announced once (rank 0) when parallel."""
    import os

    from .parallel import get_comm
    try:
        comm = args.comm_obj = get_comm(args.comm)
    except RuntimeError as exc:     # mpi4py or NCCL missing: a message, not a traceback
        raise ValueError(str(exc)) from exc
    if comm.size > 1:
        pids = comm.allgather(os.getpid())
        if comm.is_root:
            local = args.batch_size // comm.size if args.batch_size % comm.size == 0 else "?"
            print(f"lowrank {args.command}: data parallel over {comm.size} processes "
                  f"({comm.kind}); global batch {args.batch_size} = {comm.size} x {local} "
                  f"rows; pids by rank: {pids}", file=sys.stderr, flush=True)
    return comm


def _run(args) -> int:
    from . import workflows as wf
    if getattr(args, "backend", None):
        from . import backend
        backend.set_backend(args.backend)
    comm = _make_comm(args) if args.command in ("pretrain", "finetune") else None
    if args.command == "pretrain":
        spec = wf.ModelSpec(args.vocab_size, args.context, args.n_layer, args.n_head,
                            args.d_model, tie_embeddings=not args.untied)
        result = wf.pretrain(args.out, spec, wf.DataSpec(_corpus(args.corpus, "docs"),
                                                         args.max_bytes),
                             _train_config(args), dtype=args.dtype or "float32",
                             resume=args.resume, save_every=args.save_every,
                             progress=not args.no_progress, comm=comm)
        if not comm.is_root:
            return 0
        print(f"pretrained {result.total:,} parameters; validation loss {result.val_loss:.4f}; "
              f"{result.tokens_per_s:,.0f} tokens/s; saved to {result.out}")
    elif args.command == "finetune":
        options = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout}
        if args.init is not None:
            options["init"] = args.init
        if args.rslora:
            options["rslora"] = True
        options.update(_parse_set(args.set))
        options.update(args.variant_options)
        targets = args.targets if args.regex else [t for t in args.targets.split(",") if t]
        if "," in args.variant:   # several adapters over one frozen base, in one process
            from .parallel.multi_train import run_cli
            return run_cli(args, options, targets, comm)
        result = wf.finetune(args.out, args.base, args.variant, targets,
                             options if args.variant != "full" else None,
                             wf.DataSpec(_corpus(args.corpus, "code"), args.max_bytes),
                             _train_config(args), dtype=args.dtype,
                             resume=args.resume, save_every=args.save_every,
                             progress=not args.no_progress, comm=comm)
        if not comm.is_root:
            return 0
        share = 100.0 * result.trainable / result.total
        print(f"{args.variant}: {result.trainable:,} trainable parameters ({share:.2f}%); "
              f"validation loss {result.val_loss:.4f}; {result.tokens_per_s:,.0f} tokens/s; "
              f"saved to {result.out}")
        for line in getattr(result, "report", []):
            print(line)
    elif args.command in ("generate", "eval"):
        if args.adapter:
            model, tok = wf.load_finetuned(args.model, args.adapter, args.dtype)
        else:
            model, tok, _ = wf.load_base(args.model, args.dtype)
        if args.command == "generate":
            print(wf.generate(model, tok, args.prompt, args.max_new_tokens, args.temperature,
                              args.top_k, args.seed))
        else:
            data = wf.token_data(tok, wf.DataSpec(_corpus(args.corpus, "code"), args.max_bytes),
                                 model.config.context)
            print(f"validation loss {wf.evaluate(model, data, args.batch_size, args.batches):.4f}")
    elif args.command == "demo":
        from .demo import run_demo
        run_demo(args.out, pretrain_steps=args.pretrain_steps, finetune_steps=args.steps,
                 dtype=args.dtype, seed=args.seed, progress=not args.no_progress)
    elif args.command == "bench":
        from .bench import run_bench
        run_bench(steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
