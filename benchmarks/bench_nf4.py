"""QLoRA on MiniLM: LoRA on the float32 base vs LoRA on the NF4 base (docs/variants.md#nf4).

all-MiniLM-L6-v2, mean-pooled, a linear head, LoRA (r=8, α=16) on every encoder linear, on the
shipped sentiment sentences (Yelp + Amazon, 2,000; a fixed 80/20 split). The same seeds, data
order and steps for both runs; prints the test accuracy of each, the difference, and the
bits per weight of the quantized encoder linears. A few minutes on 2 CPU cores.

    python benchmarks/bench_nf4.py [--epochs 3] [--double-quant]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import lowrank as lr
from lowrank.nn.layers import Linear
from lowrank.ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
from lowrank.nn.optim import AdamW

DATA = Path(lr.__file__).parent / "text" / "datasets" / "sentiment"
TARGETS = r"encoder\.layer\.\d+\..*(query|key|value|dense)"


def sentences():
    texts, labels = [], []
    for name in ("yelp_labelled.txt", "amazon_cells_labelled.txt"):
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            text, _, label = line.rpartition("\t")
            if text:
                texts.append(text.strip())
                labels.append(int(label))
    order = np.random.default_rng(0).permutation(len(texts))
    texts, labels = [texts[i] for i in order], np.asarray(labels)[order]
    cut = int(0.8 * len(texts))
    return (texts[:cut], labels[:cut]), (texts[cut:], labels[cut:])


def pooled_forward(bert, ids, mask):
    hidden, cache = bert.forward(ids, attention_mask=mask)            # (B, T, d)
    weights = mask[..., None].astype(hidden.dtype)                     # (B, T, 1)
    count = weights.sum(axis=1)                                        # (B, 1)
    return (hidden * weights).sum(axis=1) / count, (cache, weights, count)


def pooled_backward(bert, dpooled, state):
    cache, weights, count = state
    bert.backward((dpooled / count)[:, None, :] * weights, cache)     # (B, T, d)


def run(quantize: str | None, double_quant: bool, epochs: int, batch: int, seed: int = 0,
        limit: int = 0):
    (train_x, train_y), (test_x, test_y) = sentences()
    if limit:   # a smoke run: the first ``limit`` sentences of each split
        train_x, train_y, test_x, test_y = train_x[:limit], train_y[:limit], test_x[:limit], \
            test_y[:limit]
    tok = lr.Tokenizer.from_pretrained("minilm")
    bert = lr.from_pretrained("minilm", dtype="float32")
    lr.adapters.inject(bert, lr.adapters.config("lora", r=8, alpha=16.0), TARGETS, seed=seed)
    bits = None
    if quantize:
        bits = lr.quantize_base(bert, quantize, double_quant=double_quant,
                                prefix="encoder.")["bits_per_weight"]
    head = Linear(bert.config.hidden_size, 2, seed=seed)
    params = [(f"bert.{n}", p) for n, p in bert.named_parameters(trainable_only=True)]
    params += [(f"head.{n}", p) for n, p in head.named_parameters(trainable_only=True)]
    opt = AdamW(params, lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses, start = [], time.perf_counter()
    bert.train()
    for _ in range(epochs):
        order = rng.permutation(len(train_x))
        for s in range(0, len(order) - batch + 1, batch):
            rows = order[s:s + batch]
            ids, mask = tok.encode_batch([train_x[i] for i in rows], max_length=64)
            opt.zero_grad()
            pooled, state = pooled_forward(bert, ids, mask)
            logits, head_cache = head.forward(pooled)                  # (B, 2)
            loss, ce = cross_entropy_forward(logits[:, None, :], train_y[rows][:, None])
            dlogits = cross_entropy_backward(ce)[:, 0, :]
            pooled_backward(bert, head.backward(dlogits, head_cache), state)
            opt.step()
            losses.append(loss)
    bert.eval()
    correct = 0
    for s in range(0, len(test_x), 100):
        ids, mask = tok.encode_batch(test_x[s:s + 100], max_length=64)
        pooled, _ = pooled_forward(bert, ids, mask)
        logits, _ = head.forward(pooled)
        correct += int((logits.argmax(axis=1) == test_y[s:s + 100]).sum())
    return {"accuracy": 100.0 * correct / len(test_x), "final_loss": float(np.mean(losses[-20:])),
            "bits": bits, "seconds": time.perf_counter() - start, "steps": len(losses)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="use only this many sentences "
                        "per split (a smoke run; the figures need the whole set)")
    parser.add_argument("--only", choices=("float32", "nf4"), default=None,
                        help="run one of the two (e.g. in two processes side by side)")
    args = parser.parse_args()
    results = {}
    runs = (("lora, float32 base", None), ("lora, nf4 base", "nf4"))
    for label, quantize in runs:
        if args.only and (quantize or "float32") != args.only:
            continue
        results[label] = r = run(quantize, args.double_quant, args.epochs, args.batch_size,
                                 limit=args.limit)
        bits = "" if r["bits"] is None else f", base {r['bits']:.4f} bits/weight"
        print(f"{label:<20} test accuracy {r['accuracy']:.2f}%  train loss (last 20) "
              f"{r['final_loss']:.4f}  {r['steps']} steps, {r['seconds']:.0f} s{bits}", flush=True)
    if len(results) == 2:
        a, b = (results[k]["accuracy"] for k in results)
        print(f"accuracy difference (nf4 − float32): {b - a:+.2f} points")


if __name__ == "__main__":
    main()
