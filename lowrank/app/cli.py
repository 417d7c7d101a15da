"""``lowrank`` command line: pretrain, finetune, generate, eval, predict, demo, bench.

    lowrank pretrain --out base --steps 300
    lowrank finetune --base base --variant lora --targets q,v --r 8 --alpha 16 --out lora
    lowrank generate --model base --adapter lora --prompt "def "
    lowrank finetune --base minilm --task classify --data train.csv --out clf
    lowrank demo
    mpiexec -n 2 lowrank finetune --base base --out lora   # data parallel, auto-detected
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from .. import backend
from ..formats import peft_dir
from . import chat_cli, export as export_cli, workflows as wf
from ..backend import threads
from .bench import run_bench
from .demo import run_demo
from .cli_parser import parse
from .cli_task_flags import data_options
from .multi_run import finetune_many, parse_variants
from ..parallel import ParameterDriftError, get_comm
from .run_dir import read_run
from . import chat_task_cli, classify_cli
from ..training.trainer import NonFiniteLossError, TrainConfig


def _train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       min_lr=args.lr / 10, warmup=min(args.warmup, args.steps),
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       accum_steps=args.accum_steps, eval_interval=args.eval_interval,
                       seed=args.seed, shards=args.shards,
                       loraplus_lr_ratio=getattr(args, "loraplus_lr_ratio", None),
                       schedule=getattr(args, "lr_schedule", None),
                       adamw=getattr(args, "adamw", None))


def _corpus(values, default):
    if not values:
        return default
    return values[0] if len(values) == 1 and values[0] in ("docs", "code") else list(values)


def main(argv=None) -> int:
    """Run one command; every failure is one line on stderr and a non-zero exit code
    (2: a mistake in the input, 1: training stopped, 3: a bug — LOWRANK_DEBUG=1 shows its
    traceback, 130: interrupted, 141: output closed, as into ``head``)."""
    backend.keep_freed_host_memory()   # training reuses the same large blocks every step
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = _warning_line
    try:
        _, args = parse(argv)
    except SystemExit as exc:   # --help exits 0 as usual; a mistake returns its code
        if not exc.code:
            raise
        return exc.code
    args.comm_obj = None
    try:
        with np.errstate(over="ignore", invalid="ignore"):   # non-finite: stopped and said
            return _run(args)
    except (NonFiniteLossError, ParameterDriftError) as exc:
        return _fail(args, f"lowrank: {_one_line(exc)}", 1)
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except KeyboardInterrupt:
        return _fail(args, f"lowrank {args.command}: interrupted", 130)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        return _fail(args, f"lowrank {args.command}: error: {_one_line(exc)}", 2)
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return _fail(args, f"lowrank {args.command}: error: {where}{exc.strerror or exc}", 2)
    except MemoryError:
        return _fail(args, f"lowrank {args.command}: error: out of memory (a smaller --context, "
                           "--batch-size or model?)", 2)
    except Exception as exc:   # a bug: still one line, the traceback on request
        if os.environ.get("LOWRANK_DEBUG"):
            raise
        return _fail(args, f"lowrank {args.command}: internal error: {type(exc).__name__}: "
                           f"{_one_line(exc)} (LOWRANK_DEBUG=1 shows the traceback)", 3)


def _warning_line(message, category, *_, **__) -> str:
    """A warning as the CLI prints it: one line, without Python's file and line."""
    return f"lowrank: warning: {_one_line(message)}\n"


def _short_run(args) -> None:
    """A run that is all warm-up never trains at the asked learning rate: say what to change."""
    if args.steps <= args.warmup:
        warnings.warn(f"--steps {args.steps} <= --warmup {args.warmup}: every step is warm-up "
                      f"and the learning rate never reaches --lr {args.lr:g}; use --warmup "
                      f"{max(1, args.steps // 10)} (a tenth of the steps) or more --steps")


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _quiet_stdout() -> None:
    """stdout's reader went away: stop Python from failing again when it flushes at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


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
    if getattr(args, "backend", None):
        try:
            backend.set_backend(args.backend)
        except RuntimeError as exc:   # CuPy missing or no GPU: a message, not a bug
            raise ValueError(str(exc)) from None
    if getattr(args, "threads", None) is not None:   # docs/performance.md#threads
        threads.set_threads(threads.check_threads(args.threads))
    else:
        threads.apply_cli_default()   # one BLAS thread: none spins beside other jobs
    if getattr(args, "task", None) == "chat":   # finetune / eval / demo (docs/chat.md)
        return chat_task_cli.run(args)
    if classify_cli.handles(args):     # finetune --task classify, eval --data, predict, ...
        return classify_cli.run(args, data_options(args) if hasattr(args, "format") else {})
    if chat_cli.wants(args):           # chat, generate --chat, generate of a GGUF / smollm2
        return chat_cli.run(args)
    if args.command == "export":       # docs/export.md
        return export_cli.run(args)
    comm = _make_comm(args) if args.command in ("pretrain", "finetune") else None
    if comm is not None and comm.is_root:
        _short_run(args)
    if args.command == "pretrain":
        spec = wf.ModelSpec(args.vocab_size, args.context, args.n_layer, args.n_head,
                            args.d_model, tie_embeddings=not args.untied)
        result = wf.pretrain(args.out, spec, wf.DataSpec(_corpus(args.corpus, "docs"),
                                                         args.max_bytes),
                             _train_config(args), dtype=args.dtype or "float32",
                             resume=args.resume, save_every=args.save_every,
                             progress=not args.no_progress, comm=comm, force=args.force)
        if not comm.is_root:
            return 0
        _summary(args, f"pretrained {result.total:,} parameters; validation loss "
                       f"{result.val_loss:.4f}; {result.tokens_per_s:,.0f} tokens/s; saved to "
                       f"{result.out}", result)
    elif args.command == "finetune":
        options = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout}
        if args.init is not None:
            options["init"] = args.init
        if args.rslora:
            options["rslora"] = True
        options.update(args.variant_options)     # --set and the variant's own flags
        targets = args.targets if args.regex else [t for t in args.targets.split(",") if t]
        if args.save_format == "peft" and ("," in args.variant or args.variant == "full"):
            raise ValueError("--save-format peft writes one adapter; it takes one --variant "
                             "other than 'full'")
        if "," in args.variant:   # several adapters over one frozen base, in one process
            return _finetune_many(args, options, targets, comm)
        result = wf.finetune(args.out, args.base, args.variant, targets,
                             options if args.variant != "full" else None,
                             wf.DataSpec(_corpus(args.corpus, "code"), args.max_bytes),
                             _train_config(args), dtype=args.dtype,
                             resume=args.resume, save_every=args.save_every,
                             progress=not args.no_progress, comm=comm, force=args.force,
                             quantize=args.quantize, allow_other_base=args.allow_other_base)
        if not comm.is_root:
            return 0
        share = 100.0 * result.trainable / result.total
        _summary(args, f"{args.variant}: {result.trainable:,} trainable parameters "
                       f"({share:.2f}%); validation loss {result.val_loss:.4f}; "
                       f"{result.tokens_per_s:,.0f} tokens/s; saved to {result.out}", result,
                 getattr(result, "report", []))
        if args.save_format == "peft":   # a PEFT folder beside lowrank's (which resumes)
            folder = peft_dir.save_pretrained(result.model, Path(result.out) / "peft",
                                              base=args.base)
            print(f"PEFT format: {folder} (PeftModel.from_pretrained reads it)",
                  file=sys.stderr if args.json else sys.stdout)
    elif args.command in ("generate", "eval"):
        if args.adapter is None:
            args.model, args.adapter = _base_of(args.model)
        if args.adapter:
            model, tok = wf.load_finetuned(args.model, args.adapter, args.dtype,
                                           allow_other_base=args.allow_other_base)
        else:
            model, tok, _ = wf.load_base(args.model, args.dtype)
        if args.command == "generate":
            print(wf.generate(model, tok, args.prompt, args.max_new_tokens,
                              0.8 if args.temperature is None else args.temperature,
                              40 if args.top_k is None else args.top_k, args.seed))
        else:
            data = wf.token_data(tok, wf.DataSpec(_corpus(args.corpus, "code"), args.max_bytes),
                                 model.config.context)
            loss = wf.evaluate(model, data, args.batch_size, args.batches)
            print(json.dumps({"command": "eval", "val_loss": loss}) if args.json else
                  f"validation loss {loss:.4f}")
    elif args.command == "demo":
        run_demo(args.out, pretrain_steps=args.pretrain_steps, finetune_steps=args.steps,
                 dtype=args.dtype, seed=args.seed, progress=not args.no_progress)
    elif args.command == "bench":
        rows = run_bench(steps=args.steps, out=sys.stderr if args.json else None)
        if args.json:
            print(json.dumps({"command": "bench", "rows": rows}))
        else:
            print("PyTorch+PEFT side by side: python benchmarks/bench_train.py (in a "
                  "repository checkout, with the `reference` extra)")
    return 0


def _summary(args, line: str, result, extra_lines=()) -> None:
    """The run's last words: a line for a person, or with ``--json`` one JSON record (the
    person's lines then go to stderr)."""
    if not args.json:
        print(line)
        for extra in extra_lines:
            print(extra)
        return
    for extra in (line, *extra_lines):
        print(extra, file=sys.stderr)
    record = {k: v for k, v in vars(result).items() if isinstance(v, (int, float, str))}
    print(json.dumps({"command": args.command, "variant": getattr(args, "variant", None),
                      **record, "out": str(result.out)}, default=str))


def _base_of(model_dir):
    """``(base, adapter)`` for ``--model``: an adapter directory names its base in run.json."""
    run = read_run(model_dir)
    if run.get("kind") != "adapter":
        return model_dir, None
    for base in (run.get("base"), run.get("base_path")):
        if base and Path(base).is_dir():
            return base, model_dir
    raise ValueError(f"{model_dir} is an adapter whose base {run.get('base')!r} (from its "
                     "run.json) is not found; pass --model BASE --adapter "
                     f"{model_dir}")


def _finetune_many(args, options: dict, targets, comm) -> int:
    """``finetune --variant a,b,...``: train them together and print one line each."""
    if comm is not None and comm.size > 1:
        raise ValueError("--variant with several adapters trains them in one process; "
                         "run it without mpiexec")
    variants = parse_variants(args.variant)
    results = finetune_many(args.out, args.base, variants, targets, options,
                            wf.DataSpec(_corpus(args.corpus, "code"), args.max_bytes),
                            _train_config(args), dtype=args.dtype, resume=args.resume,
                            save_every=args.save_every, progress=not args.no_progress,
                            force=args.force)
    total = sum(r.tokens_per_s for r in results)   # each: median over its steps
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    for (variant, _), result in zip(variants, results):
        share = 100.0 * result.trainable / result.total
        say(f"{variant}: {result.trainable:,} trainable parameters ({share:.2f}%); "
            f"validation loss {result.val_loss:.4f}; saved to {result.out}")
        for line in result.report:
            say(line)
    say(f"{len(results)} adapters trained together over one base: {total:,.0f} tokens/s in all")
    if args.json:
        print(json.dumps({"command": "finetune", "tokens_per_s": total, "adapters": [
            {"variant": variant, "out": str(r.out), "trainable": r.trainable, "total": r.total,
             "val_loss": r.val_loss} for (variant, _), r in zip(variants, results)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
