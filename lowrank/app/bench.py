"""Training throughput: full fine-tuning vs LoRA (``lowrank bench``), interleaved in one run.

Bench config (the issue's): V=1024, d=256, L=4, H=4, T=128, B=8, float32, LoRA r=8 on
q, k, v, o, fc1, fc2. Each round times ``steps`` optimizer steps of every setup in turn, so
machine noise hits all setups alike; the median round is reported. A large matmul timed in
the same run gives the achievable GFLOP/s.

Another implementation joins the same rounds as a ``baseline``: a worker run in its own
process (see ``run_bench``). The PyTorch+PEFT baseline lives with the benchmarks of a
repository checkout, ``python benchmarks/bench_train.py``: the library never imports
PyTorch or the test oracles.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from .. import adapters, backend
from ..backend import threads
from ..models import GPT, GPTConfig
from ..nn.optim import AdamW
from ..parallel import BatchShards

BENCH = GPTConfig(vocab_size=1024, context=128, n_layer=4, n_head=4, d_model=256)
BATCH = 8
TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
RANK = 8
PAUSE_S = 0.3


def step_flops(cfg: GPTConfig, tokens: int, lora: bool) -> float:
    """Matmul FLOPs of one step: forward F, backward 2F (dx and dW) or F (dx only) + adapters."""
    d, L, T = cfg.d_model, cfg.n_layer, cfg.context
    linear = 2 * (L * 12 * d * d + cfg.vocab_size * d) * tokens
    attention = 2 * 2 * L * T * d * tokens           # QKᵀ and AV (causal half not skipped)
    forward = linear + attention
    if not lora:
        return 3 * forward
    adapter = 2 * L * RANK * (4 * 2 * d + 2 * 5 * d) * tokens * 3   # u, dB, du, dA per Linear
    return 2 * forward + adapter


def _ours(lora: bool, seed=0, shards: int = 1):
    """One optimizer step of the bench config; ``shards > 1`` splits the batch over that many
    threads, one BLAS thread each (``parallel.BatchShards``, docs/performance.md#batch-shards)."""
    model = GPT(BENCH, seed=seed, dtype="float32")
    if lora:
        adapters.inject(model, adapters.config("lora", r=RANK, alpha=16.0), TARGETS, seed=seed)
    opt = AdamW(model.named_parameters(trainable_only=True), lr=1e-4)
    xp = model.xp
    rng = np.random.default_rng(seed)
    idx = backend.asarray(rng.integers(0, BENCH.vocab_size, (BATCH, BENCH.context)), xp=xp)
    tgt = backend.asarray(rng.integers(0, BENCH.vocab_size, (BATCH, BENCH.context)), xp=xp)
    model.zero_grad()
    sharded = BatchShards(model, shards)
    parts = sharded.split(idx, tgt)

    def step():
        if shards > 1:
            sharded.loss_backward(parts)
        else:
            loss, cache = model.loss(idx, tgt)
            model.loss_backward(cache)
        opt.step()
        model.zero_grad()
        backend.synchronize(xp)
    return step, model.num_parameters(True)


def matmul_gflops(size=2048, repeat=3, cpu: bool = False) -> float:
    """GFLOP/s of the best of ``repeat`` float32 ``size``³ products (wall time, or with
    ``cpu`` the process's CPU time)."""
    a = backend.host_normal(0, (size, size), dtype="float32", xp=backend.xp_default())
    clock = time.process_time if cpu else time.perf_counter
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        a @ a
        backend.synchronize()
        best = min(best, clock() - start)
    return 2 * size**3 / best / 1e9


def run_bench(steps: int = 10, rounds: int = 5, baseline=None, shards: int | None = None,
              out=None) -> dict:
    """Time our full fine-tuning and LoRA steps; returns ``{setup: {"ms", "tokens_per_s",
    "gflops"}}`` and ``"matmul_gflops"``.

    ``baseline(conn, steps)``, if given, runs in a spawned process and takes part in every
    round: it first sends ``{setup name: trainable parameters}``, then answers each setup
    name it receives with the seconds per step of ``steps`` steps (or a pair: wall seconds,
    CPU seconds of its process), and returns when it receives ``None``. A name holding "lora"
    counts the adapter's FLOPs.

    Wall time is the figure that counts; CPU time (``time.process_time``) is printed beside
    it because on a shared machine it is far steadier, and with one thread per side it is
    the work done (with more, it also counts threads spinning while they wait).

    ``shards`` (default: the usable cores) adds our two setups once more with each batch
    split over that many threads (``shard_name``); 1 leaves them out. The report goes to
    ``out`` (default: stdout), a line of progress per round to stderr.
    """
    out = sys.stdout if out is None else out

    def report(line=""):
        print(line, file=out, flush=True)

    def progress(line):
        print(f"bench: {line}", file=sys.stderr, flush=True)
    backend.keep_freed_host_memory()   # as `lowrank` does for every command
    shards = threads.usable_cores() if shards is None else shards
    setups = {"ours full": _ours(False), "ours lora": _ours(True)}
    if shards > 1:
        setups[shard_name("full", shards)] = _ours(False, shards=shards)
        setups[shard_name("lora", shards)] = _ours(True, shards=shards)
    trainables = {name: t for name, (_, t) in setups.items()}
    worker = None
    if baseline is not None:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        worker = ctx.Process(target=baseline, args=(child, steps), daemon=True)
        worker.start()
        trainables.update(conn.recv())
    progress(f"{len(trainables)} setups x {rounds} rounds of {steps} steps; warming up")
    times = {name: [] for name in trainables}
    cpu = {name: [] for name in trainables}
    peaks, cpu_peaks = [], []
    for fn, _ in setups.values():   # warm-up: allocations, BLAS threads
        fn()
        fn()
    for round_ in range(1, rounds + 1):   # interleaved: every setup sees the same noise
        peaks.append(matmul_gflops(repeat=2))
        cpu_peaks.append(matmul_gflops(repeat=2, cpu=True))
        for name in times:
            if name in setups:
                time.sleep(PAUSE_S)   # let the other side's threads stop spinning
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    setups[name][0]()
                times[name].append((time.perf_counter() - start) / steps)
                cpu[name].append((time.process_time() - start_cpu) / steps)
            else:
                conn.send(name)
                reply = conn.recv()
                wall, used = reply if isinstance(reply, tuple) else (reply, float("nan"))
                times[name].append(wall)
                cpu[name].append(used)
        progress(f"round {round_}/{rounds} done")
    if worker is not None:
        conn.send(None)
        worker.join()
    peak = float(np.median(peaks))
    tokens = BATCH * BENCH.context
    report(f"bench config V={BENCH.vocab_size} d={BENCH.d_model} L={BENCH.n_layer} "
          f"H={BENCH.n_head} T={BENCH.context} B={BATCH} float32; LoRA r={RANK} on "
          f"{','.join(TARGETS)}; median of {rounds} interleaved rounds of {steps} steps"
          + (" (the baseline in its own process, taking turns)" if worker else ""))
    report(f"large matmul (2048^3, float32, median over the rounds): {peak:.1f} GFLOP/s; "
          f"BLAS: {threads_text()}")
    report(f"{'setup':<20} {'trainable':>10} {'ms/step':>9} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'% of matmul':>11} {'CPU ms/step':>11}")
    result = {"matmul_gflops": peak}
    for name, trainable in trainables.items():
        sec = float(np.median(times[name]))
        flops = step_flops(BENCH, tokens, "lora" in name)
        spread = (tokens / max(times[name]), tokens / min(times[name]))
        cpu_ms = float(np.median(cpu[name])) * 1e3
        result[name] = {"ms": sec * 1e3, "tokens_per_s": tokens / sec, "cpu_ms": cpu_ms,
                        "gflops": flops / sec / 1e9, "spread": spread}
        report(f"{name:<20} {trainable:>10,} {sec * 1e3:9.1f} {tokens / sec:10,.0f} "
              f"{flops / sec / 1e9:8.1f} {100 * flops / sec / 1e9 / peak:10.1f}% "
              f"{cpu_ms:11.1f}   (rounds: {spread[0]:,.0f}-{spread[1]:,.0f} tokens/s)")
    result["shards"] = shards
    cpu_peak = float(np.median(cpu_peaks))
    for full, lora in (("ours full", "ours lora"),
                       (shard_name("full", shards), shard_name("lora", shards))):
        if lora in result:
            _targets(result, full, lora, peak, cpu_peak, tokens, report)
    bound = step_flops(BENCH, tokens, True) / step_flops(BENCH, tokens, False)
    report(f"(the matrix products alone give LoRA / full = {bound:.2f}: the rest of the steps, "
          "elementwise work both share, pulls the ratio toward 1)")
    return result


def shard_name(setup: str, shards: int) -> str:
    """The bench's name of our ``setup`` ("full" or "lora") with ``shards`` batch shards."""
    return f"ours {setup} x{shards} shards"


def _targets(result: dict, full: str, lora: str, peak: float, cpu_peak: float, tokens: int,
             report=print):
    ratio = result[lora]["ms"] / result[full]["ms"]
    cpu_ratio = result[lora]["cpu_ms"] / result[full]["cpu_ms"]
    share = result[lora]["gflops"] / peak
    cpu_share = step_flops(BENCH, tokens, True) / (result[lora]["cpu_ms"] / 1e3) / 1e9 / cpu_peak
    report(f"\n{lora}: LoRA step / full step = {ratio:.3f} (target <= 0.70) "
          f"{'met' if ratio <= 0.70 else 'NOT met'}; in CPU time {cpu_ratio:.3f}")
    report(f"{lora}: LoRA step FLOP/s / large matmul FLOP/s = {100 * share:.0f}% "
          f"(target >= 60%) {'met' if share >= 0.60 else 'NOT met'}")
    report(f"   in CPU time (the work done, with 1 thread): {100 * cpu_share:.0f}% of the "
          f"matmul's {cpu_peak:.0f} GFLOP per CPU-second")


def threads_text() -> str:
    info = threads.thread_info()
    return ", ".join(f"{i['library']} {i['threads']} threads ({i['kernel']})"
                     for i in info if i["api"] == "blas") or "unknown"
