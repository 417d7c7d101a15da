"""What ``--task chat`` runs (docs/chat.md); its flags are the one parser's (``cli_parser``):

    lowrank finetune --base smollm2 --task chat --data train.jsonl [--eval-data val.jsonl]
                     --variant lora --targets all-linear --out DIR [--metric accuracy]
    lowrank eval --task chat --adapter DIR --data test.jsonl [--metric accuracy]
    lowrank eval --task chat --model smollm2 --data test.jsonl     # the base alone
    lowrank demo --task chat [--out DIR] [--variants lora,dora]

A bad line of a data file prints one line naming file:line, before anything is written.
"""
from __future__ import annotations

from ..adapters import available
from ..tasks import chat, chat_io
from ..tasks.chat_data import read_jsonl
from .chat_demo import run_demo
from .run_dir import prepare_out
from .run_lock import hold

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
            loraplus_lr_ratio=args.loraplus_lr_ratio, max_new_tokens=args.max_new_tokens,
            shards=args.shards)
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
                {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, **args.variant_options},
            _targets(args.targets), args.dtype, args.resume,
                args.save_every, not args.no_progress, on_epoch, args.metric == "accuracy",
                quantize=args.quantize)
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
                 progress=not args.no_progress, quantize=args.quantize, shards=args.shards)
    return 0
