"""Many adapters over one base: tokens/s of K = 3 LoRA adapters trained together (one process,
one frozen base, concatenated batch) vs one after another (three single-adapter models,
one step each), interleaved step by step in one run so machine drift hits both alike.

    python benchmarks/bench_multi.py [--steps 20] [--warmup 3] [--k 3] [--batch 8]

Config: GPTConfig(vocab_size=1024, context=128, n_layer=4, n_head=4, d_model=256), float32,
NumPy backend, synthetic tokens. Adapters: LoRA r = 8, alpha 16 on q, k, v, o, fc1, fc2,
seeds 0..K-1, lr 1e-3 · (1, 2, 0.5, ...), B = 8 rows each. "together (fallback)" is the same
multi-adapter model with the shared base product switched off (each adapter runs its own
full forward/backward on its rows): the difference to "together" is what sharing
``x W0ᵀ`` and ``G W0`` buys; the difference to "one after another" the rest (one pass of the
frozen model, bigger GEMMs, one Python step instead of K).
"""
import argparse
import statistics
import time

import numpy as np

CONFIG = dict(vocab_size=1024, context=128, n_layer=4, n_head=4, d_model=256)
BATCH = 8
TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
LR_FACTORS = (1.0, 2.0, 0.5, 1.5, 0.75, 3.0)


class RandomTokens:
    context = CONFIG["context"]

    def batch(self, split, batch_size, rng):
        x = rng.integers(0, CONFIG["vocab_size"], (batch_size, self.context))
        return x, np.roll(x, -1, axis=1)


def train_config(k, steps):
    from lowrank.training.trainer import TrainConfig
    return TrainConfig(steps=steps, batch_size=BATCH, lr=1e-3 * LR_FACTORS[k % 6],
                       min_lr=1e-5, warmup=1, seed=k)


def lora(k):
    import lowrank as lr
    return lr.adapters.config("lora", r=8, alpha=16)


def together(K, steps, fast=True):
    import lowrank as lr
    from lowrank.multi import MultiTrainer, inject_multi, multi_modules
    model = lr.GPT(lr.GPTConfig(**CONFIG), seed=0, dtype="float32")
    inject_multi(model, [(lora(k), TARGETS, k) for k in range(K)])
    for _, m in multi_modules(model):
        m.fast = fast
    return MultiTrainer(model, [(RandomTokens(), train_config(k, steps)) for k in range(K)])


def alone(K, steps):
    import lowrank as lr
    from lowrank.training.trainer import Trainer
    trainers = []
    for k in range(K):
        model = lr.GPT(lr.GPTConfig(**CONFIG), seed=0, dtype="float32")
        lr.adapters.inject(model, lora(k), TARGETS, seed=k)
        trainers.append(Trainer(model, RandomTokens(), train_config(k, steps)))
    return trainers


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="rows per adapter")
    args = parser.parse_args()
    global BATCH
    BATCH = args.batch
    K, total = args.k, args.steps + args.warmup
    modes = {"together": together(K, total),
             "together (fallback)": together(K, total, fast=False),
             "one after another": alone(K, total)}
    steps = {"together": modes["together"].train_step,
             "together (fallback)": modes["together (fallback)"].train_step,
             "one after another": lambda: [tr.train_step() for tr in modes["one after another"]]}
    seconds = {name: [] for name in steps}
    for i in range(total):
        for name, step in steps.items():   # interleaved: one step of each per round
            t = timed(step)
            if i >= args.warmup:
                seconds[name].append(t)
    tokens = K * BATCH * CONFIG["context"]
    print(f"K = {K} LoRA r=8 adapters, B = {BATCH} rows each ({tokens} tokens per step of "
          f"all K), {args.steps} timed steps after {args.warmup} warm-up, median:")
    speed = {}
    for name, values in seconds.items():
        s = statistics.median(values)
        speed[name] = tokens / s
        print(f"  {name:<22} {s * 1e3:8.1f} ms/step  {speed[name]:10,.0f} tokens/s")
    base = speed["one after another"]
    print(f"ratio together / one after another: {speed['together'] / base:.2f}x")
    print(f"ratio together (fallback) / one after another: "
          f"{speed['together (fallback)'] / base:.2f}x")
    # the three ways train the same adapters: a quick check that they agree
    views = modes["together"].views
    ref = modes["one after another"]
    worst = max(float(np.abs(p.data - dict(ref[k].model.named_parameters())[n].data).max())
                for k, view in enumerate(views)
                for n, p in view.named_parameters(trainable_only=True))
    print(f"max |together - alone| over adapter weights after {total} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
