"""A training loop in Python, written the way a PyTorch + PEFT user writes one.

    python examples/train_lora.py            # about 10 s on 2 cores

A tiny GPT is pretrained on one text, then adapted with LoRA to another: the adapter's loss
falls while the base stays frozen; the adapter is saved in PEFT's format and merged into
plain weights that give the same outputs. docs/training.md#python-loop explains each line.
"""
from __future__ import annotations

import sys
import tempfile

import numpy as np

import lowrank as lr
from lowrank.nn.optim import AdamW, clip_grad_norm, lr_at
from lowrank.text.tokenizer import train_tokenizer

BASE_TEXT = "the cat sat on the mat. the dog sat on the log. " * 40
NEW_TEXT = "a bird flew over the tree. a fish swam under the boat. " * 40


def batches(ids, context: int, batch_size: int, rng):
    """Random windows of ``ids``: inputs ``(B, T)`` and next-token targets ``(B, T)``."""
    while True:
        starts = rng.integers(0, len(ids) - context - 1, batch_size)
        x = np.stack([ids[s:s + context] for s in starts]).astype(np.int64)       # (B, T)
        y = np.stack([ids[s + 1:s + context + 1] for s in starts]).astype(np.int64)
        yield x, y


def train(model, ids, steps: int, peak_lr: float, seed: int = 0) -> list[float]:
    """``steps`` AdamW steps on ``ids``: zero the gradients, forward, backward, clip, step."""
    params = list(model.named_parameters(trainable_only=True))
    opt = AdamW(params, lr=peak_lr, weight_decay=0.0)
    data = batches(ids, context=32, batch_size=8, rng=np.random.default_rng(seed))
    losses = []
    for step in range(steps):
        x, y = next(data)
        model.zero_grad()                        # gradients accumulate: zero them first
        loss, cache = model.loss(x, y)           # forward: the loss and what backward needs
        model.loss_backward(cache)               # backward: every .grad filled in
        clip_grad_norm(params, 1.0)
        opt.step(lr=lr_at(step, peak_lr, warmup=5, total=steps))
        losses.append(float(loss))
    return losses


def main(out_dir=None, steps: int = 60) -> dict:
    tok = train_tokenizer(BASE_TEXT + NEW_TEXT, vocab_size=300)
    base_ids, new_ids = tok.encode(BASE_TEXT), tok.encode(NEW_TEXT)
    base = lr.GPT(lr.GPTConfig(vocab_size=len(tok), context=32, n_layer=2, n_head=2,
                               d_model=64), seed=0)
    train(base, base_ids, steps, peak_lr=3e-3)                  # a base model to adapt

    config = lr.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v", "fc1"])
    model = lr.get_peft_model(base, config)                     # the base is frozen now
    model.print_trainable_parameters()
    losses = train(model, new_ids, steps, peak_lr=1e-2)
    print(f"LoRA on the new text: loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}")

    out_dir = out_dir or tempfile.mkdtemp(prefix="lora-")
    model.save_pretrained(out_dir)                              # PEFT's files
    x = np.asarray(new_ids[None, :32], dtype=np.int64)          # (1, T)
    adapted = model(x)                                          # logits (1, T, V)
    merged = model.merge_and_unload()                           # plain Linears again
    gap = float(np.abs(merged(x) - adapted).max())
    print(f"saved to {out_dir}; merged logits differ by {gap:.1e}")
    return {"first": float(np.mean(losses[:5])), "last": float(np.mean(losses[-5:])),
            "merge_gap": gap, "out": out_dir}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
