"""all-MiniLM-L6-v2, the sentiment recipe's training step: lowrank's LoRA against PyTorch+PEFT's
LoRA and PyTorch's full fine-tuning, each setup in its own process, interleaved.

The recipe (lowrank's classification task): batches of 32 sentences of the shipped sentiment
data, at most 64 tokens, padded to the batch's longest (lowrank's BERT computes the real
tokens only, docs/performance.md#unpadding; PyTorch computes every padded row too); LoRA r=8, alpha=16, dropout 0.1 on
the six encoder linears (query, key, value, attention.output.dense, intermediate.dense,
output.dense); a linear head on the [CLS] state, cross-entropy, AdamW. The encoders' own
dropout is off on both sides; PyTorch runs eager attention,
float32. A step = forward, loss, backward, optimizer step. Every setup cycles over the same
``--batches`` batches; tokens = padded B·T, the same on both sides.

Each setup lives in its own process (spawned), so its peak resident memory (ru_maxrss) is its
own, and the processes take turns: every round times ``--steps`` steps of each in turn, so
machine load hits all alike; the median round is reported.

    python benchmarks/bench_minilm.py [--steps 3] [--rounds 3] [--threads N]

Targets (issue 16): LoRA tokens/s >= 2x PyTorch+PEFT's LoRA and >= 1.2x PyTorch's full
fine-tuning; lowrank LoRA peak RSS <= 0.6x PyTorch+PEFT's.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
           "output.dense"]
RANK, ALPHA, DROPOUT, LR, BATCH, MAX_LEN = 8, 16.0, 0.1, 5e-4, 32, 64
SETUPS = ("lowrank lora", "torch+peft lora", "torch full", "lowrank full", "lowrank lora x2 shards")


def batches(n_batches: int):
    """``[(ids, mask, labels)]``: host int64 arrays of the shipped sentiment data."""
    import lowrank as lr
    root = Path(lr.__file__).parent / "text" / "datasets" / "sentiment"
    rows = []
    for name in sorted(root.glob("*_labelled.txt")):
        for line in name.read_text(encoding="utf-8").splitlines():
            if line.strip():
                text, label = line.rsplit("\t", 1)
                rows.append((text, int(label)))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    tok = lr.Tokenizer.from_pretrained("minilm")
    out = []
    for b in range(n_batches):
        chosen = [rows[i] for i in order[b * BATCH:(b + 1) * BATCH]]
        ids, mask = tok.encode_batch([t for t, _ in chosen], max_length=MAX_LEN)
        out.append((ids, mask, np.array([y for _, y in chosen], dtype=np.int64)))
    return out


def lowrank_setup(lora: bool, data, shards: int = 1):
    """The step; ``shards > 1`` splits each batch's rows over that many threads
    (``lowrank.parallel.BatchShards``, docs/performance.md#batch-shards) through
    ``SequenceClassifier``'s loss (mean pooling into a linear head: one (B, d) pass more than
    the [CLS] row, no more products)."""
    import lowrank as lr
    from lowrank import backend
    from lowrank.nn.layers import Linear
    from lowrank.ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
    from lowrank.nn.optim import AdamW
    backend.keep_freed_host_memory()   # as the CLI does
    model = lr.from_pretrained("minilm", dtype="float32")
    if lora:
        lr.adapters.inject(model, lr.adapters.config("lora", r=RANK, alpha=ALPHA,
                                                     dropout=DROPOUT), TARGETS)
    d = model.config.hidden_size
    head = Linear.from_arrays(backend.host_normal(0, (2, d), 0.02, "float32", model.xp),
                              model.xp.zeros((2,), dtype="float32"))
    named = [(f"encoder.{n}", p) for n, p in model.named_parameters(trainable_only=True)]
    opt = AdamW(named + [(f"head.{n}", p) for n, p in head.named_parameters()], lr=LR)
    model.train()
    if shards > 1:
        return _sharded_step(model, shards), lambda batch: batch

    def step(ids, mask, labels):
        model.zero_grad()
        head.zero_grad()
        hidden, cache = model.forward(ids, attention_mask=mask)        # (B, T, d)
        logits, c_head = head.forward(hidden[:, 0])                    # (B, 2)
        loss, c_ce = cross_entropy_forward(logits[:, None, :], labels[:, None])
        dcls = head.backward(cross_entropy_backward(c_ce)[:, 0], c_head)   # (B, d)
        dhidden = model.xp.zeros_like(hidden)
        dhidden[:, 0] = dcls
        model.backward(dhidden, cache)
        opt.step()
        return loss
    return step, lambda batch: batch


def _sharded_step(model, shards: int):
    from lowrank.models import SequenceClassifier
    from lowrank.nn.optim import AdamW
    from lowrank.parallel import BatchShards
    from lowrank.tasks.text_data import TextBatch
    clf = SequenceClassifier(model, num_labels=2, pooling="mean", dropout=0.0)
    opt = AdamW(clf.named_parameters(trainable_only=True), lr=LR)
    sharded = BatchShards(clf, shards)

    def step(ids, mask, labels):
        clf.zero_grad()
        batch = TextBatch(ids, mask, labels)
        loss = sharded.loss_backward([(b - a, (batch.rows(a, b),))
                                      for a, b in sharded.bounds(len(labels))])
        opt.step()
        return loss
    return step


def torch_setup(lora: bool, data):
    import torch
    import transformers
    from lowrank.formats.hf_model import resolve
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(str(resolve("minilm")),
                                                   attn_implementation="eager")
    for module in model.modules():   # as lowrank's BERT: no hidden/attention dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS))
    model.train()
    head = torch.nn.Linear(model.config.hidden_size, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)

    def step(ids, mask, labels):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden[:, 0]), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, lambda batch: tuple(torch.from_numpy(a) for a in batch)


def worker(name: str, conn, n_batches: int, steps: int, threads) -> None:
    """One setup in this process: answers each request with (seconds per step, peak RSS)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lowrank.backend import threads as blas_threads
    if threads:
        blas_threads.set_threads(threads)
    if name.startswith("torch"):
        import torch
        if threads:
            torch.set_num_threads(threads)
    data = batches(n_batches)
    make = torch_setup if name.startswith("torch") else lowrank_setup
    shards = int(name.split(" x")[1].split()[0]) if " x" in name else 1
    step, convert = (make(name.endswith("lora"), data) if shards == 1
                     else lowrank_setup(True, data, shards))
    data = [convert(b) for b in data]
    for b in data:   # warm-up: every shape once
        step(*b)
    conn.send("ready")
    i = 0
    while conn.recv() is not None:
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step(*data[i % len(data)])
            i += 1
        seconds = (time.perf_counter() - start) / steps
        cpu = (time.process_time() - start_cpu) / steps
        conn.send((seconds, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def step_gemm_flops(cfg, mask) -> float:
    """Matrix-product FLOPs a LoRA step cannot avoid: the forward and the input gradient of
    every encoder product on the real tokens (lowrank skips the padded ones,
    docs/performance.md#unpadding): linears 2·N·(4d² + 2·d·d_ff) a layer over the N real
    tokens, attention QKᵀ and PV 4·Σ L²·d over the sequences' lengths L; the input gradient
    taken as one forward for the linears and two for attention. The adapters' own products
    (rank 8) are left out."""
    d, d_ff, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    lengths = mask.sum(axis=1)
    linear = 2 * int(lengths.sum()) * (4 * d * d + 2 * d * d_ff)
    attention = 4 * int((lengths ** 2).sum()) * d
    return L * (2 * linear + 3 * attention)


def matmul_gflops(size=2048, repeat=3, clock=time.perf_counter) -> float:
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        a @ a
        best = min(best, clock() - start)
    return 2 * size**3 / best / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per setup per round "
                        "(a multiple of --batches keeps the rounds alike)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every setup (default: each library's own)")
    parser.add_argument("--setups", default=",".join(SETUPS))
    args = parser.parse_args(argv)
    names = [s for s in args.setups.split(",") if s]
    data = batches(args.batches)
    tokens = statistics.mean(ids.size for ids, _, _ in data)   # padded B·T per step
    ctx = multiprocessing.get_context("spawn")
    conns, procs = {}, []
    for name in names:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, theirs, args.batches, args.steps,
                                                args.threads), daemon=True)
        proc.start()
        conns[name], procs = mine, procs + [proc]
    for name in names:
        if conns[name].recv() != "ready":
            raise RuntimeError(f"{name}: worker failed")
    times, cpu, rss = {n: [] for n in names}, {n: [] for n in names}, {}
    for _ in range(args.rounds):
        for name in names:
            time.sleep(0.3)   # let the previous setup's threads stop spinning
            conns[name].send(name)
            seconds, used, rss[name] = conns[name].recv()
            times[name].append(seconds)
            cpu[name].append(used)
    for name in names:
        conns[name].send(None)
    for proc in procs:
        proc.join()
    if args.threads:
        from lowrank.backend import threads as blas_threads
        blas_threads.set_threads(args.threads)
    one_thread = args.threads == 1   # then CPU time is the work done: steadier, compare it
    peak = matmul_gflops(clock=time.process_time if one_thread else time.perf_counter)
    from lowrank.formats.hf_model import resolve
    import lowrank as lr
    cfg = lr.models.hf.bert_config(__import__("json").loads(
        (Path(resolve("minilm")) / "config.json").read_text()))
    floor_s = statistics.mean(step_gemm_flops(cfg, mask) for _, mask, _ in data) / peak / 1e9

    print(f"all-MiniLM-L6-v2 sentiment recipe: batch {BATCH}, <= {MAX_LEN} tokens "
          f"(mean padded {tokens:.0f} tokens/step over {args.batches} batches), LoRA r={RANK} "
          f"alpha={ALPHA:g} dropout={DROPOUT} on {len(TARGETS)} encoder linears, AdamW; "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps; threads "
          f"{args.threads or 'default'}; each setup in its own process")
    speed, cpu_speed = {}, {}
    print(f"  {'setup':<22} {'ms/step':>9} {'tokens/s':>9} {'spread':>15} {'peak RSS':>9} "
          f"{'CPU ms/step':>11}")
    for name in names:
        med = statistics.median(times[name])
        speed[name] = tokens / med
        cpu_speed[name] = tokens / statistics.median(cpu[name])
        lo, hi = tokens / max(times[name]), tokens / min(times[name])
        print(f"  {name:<22} {med * 1e3:9.1f} {speed[name]:9,.0f} {lo:7,.0f}-{hi:<7,.0f} "
              f"{rss[name] / 2**20:7,.0f} MB {tokens / cpu_speed[name] * 1e3:11.1f}")
    print("  (CPU time: steadier on a shared machine; with one thread per setup it is the "
          "work done, with more it also counts threads spinning)")

    def ratio(a, b, what, target, higher=True):
        if a in speed and b in speed:
            value = speed[a] / speed[b] if what == "tokens/s" else rss[a] / rss[b]
            ok = value >= target if higher else value <= target
            extra = (f"; in CPU time {cpu_speed[a] / cpu_speed[b]:.2f}x"
                     if what == "tokens/s" else "")
            print(f"{what} {a} / {b} = {value:.2f}x (target {'>=' if higher else '<='} "
                  f"{target}) {'met' if ok else 'NOT met'}{extra}")
    ratio("lowrank lora", "torch+peft lora", "tokens/s", 2.0)
    ratio("lowrank lora", "torch full", "tokens/s", 1.2)
    ratio("lowrank lora", "torch+peft lora", "peak RSS", 0.6, higher=False)
    ratio("lowrank full", "torch full", "tokens/s", 1.0)
    ratio("lowrank lora x2 shards", "torch+peft lora", "tokens/s", 2.0)
    if "torch+peft lora" in speed:
        peft = (cpu_speed if one_thread else speed)["torch+peft lora"]
        clock = "CPU time" if one_thread else "wall time"
        print(f"bound ({clock}): a large float32 matmul runs at {peak:.0f} GFLOP/s; at that "
              f"rate the products a LoRA step cannot avoid (forward + input gradient) alone "
              f"take {floor_s * 1e3:.0f} ms/step = {tokens / floor_s:,.0f} tokens/s = "
              f"{tokens / floor_s / peft:.2f}x PyTorch+PEFT's LoRA")


if __name__ == "__main__":
    main()
