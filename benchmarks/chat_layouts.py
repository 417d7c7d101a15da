"""Padded rows or packed rows for the chat recipe's batches: token slots and the products'
work of each layout, counted (not timed) on the demo's data (docs/chat.md#data).

Padded: each batch's conversations one to a row, padded to the batch's longest (what lowrank
does). Packed: the same conversations first-fit-decreasing into rows of at most ``cap``
tokens, padded to the longest packed row, with attention kept inside each conversation,
either by a dense (T, T) kernel with a block mask or by a kernel that computes only each
conversation's own block. Work: 4·T·P for the frozen linears' forward and dx, 12·L·T²·d for
attention (as ``bench_chat.py`` counts them), the head aside (it runs on the labels either way).

    python benchmarks/chat_layouts.py [--batches 32] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def first_fit_decreasing(lengths, cap: int) -> list[int]:
    """The packed rows' lengths."""
    rows: list[int] = []
    for n in sorted(lengths, reverse=True):
        for i, used in enumerate(rows):
            if used + n <= cap:
                rows[i] += n
                break
        else:
            rows.append(int(n))
    return rows


def main() -> None:
    from lowrank.app.chat_demo import demo_data
    from lowrank.formats.model_dir import inspect
    from lowrank.tasks.chat_data import encode_conversations
    from lowrank.text.chat_template import ChatTemplate
    from lowrank.text.tokenizer import Tokenizer
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tok, template = Tokenizer.from_pretrained("smollm2"), ChatTemplate.from_pretrained("smollm2")
    train, _ = demo_data()
    rows, _ = encode_conversations(template, tok, train[:args.batches * args.batch_size], 256)
    lengths = np.array([len(ids) for ids, _ in rows])
    c = inspect("smollm2").config
    d, L = c["hidden_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    P = L * (2 * d * d + 2 * d * kv + 3 * d * c["intermediate_size"])

    def linears(slots):
        return 4.0 * slots * P

    def attention(T):
        return 12.0 * L * T * T * d

    order = np.random.Generator(np.random.PCG64(args.seed)).permutation(len(rows))
    batches = [lengths[order[s * args.batch_size:(s + 1) * args.batch_size]]
               for s in range(args.batches)]
    real = int(sum(b.sum() for b in batches))
    slots = sum(len(b) * int(b.max()) for b in batches)
    padded = sum(len(b) * (linears(b.max()) + attention(b.max())) for b in batches)
    print(f"{len(rows)} conversations of {lengths.min()}-{lengths.max()} tokens "
          f"(median {np.median(lengths):.0f}), {args.batches} batches of {args.batch_size}")
    print(f"padded: {slots} slots, {real / slots:.1%} real; work 1.000")
    for cap in (256, 512):
        packed = [first_fit_decreasing(b, cap) for b in batches]
        pslots = sum(len(p) * max(p) for p in packed)
        dense = sum(len(p) * (linears(max(p)) + attention(max(p))) for p in packed)
        blocks = sum(len(p) * linears(max(p)) + sum(attention(n) for n in b)
                     for p, b in zip(packed, batches))
        print(f"packed into rows of <= {cap}: {pslots} slots, {real / pslots:.1%} real; work "
              f"{dense / padded:.3f} (dense masked attention), "
              f"{blocks / padded:.3f} (attention per conversation)")


if __name__ == "__main__":
    main()
