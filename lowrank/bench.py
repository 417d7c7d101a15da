"""Training throughput: full fine-tuning vs LoRA, ours vs PyTorch+PEFT, interleaved in one run.

Bench config (the issue's): V=1024, d=256, L=4, H=4, T=128, B=8, float32, LoRA r=8 on
q, k, v, o, fc1, fc2. Each round times ``steps`` optimizer steps of every setup in turn, so
machine noise hits all setups alike; the median round is reported. A large matmul timed in
the same run gives the achievable GFLOP/s.
"""
from __future__ import annotations

import time

import numpy as np

from . import adapters, backend
from .models import GPT, GPTConfig
from .optim import AdamW

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


def _ours(lora: bool, seed=0):
    model = GPT(BENCH, seed=seed, dtype="float32")
    if lora:
        adapters.inject(model, adapters.config("lora", r=RANK, alpha=16.0), TARGETS, seed=seed)
    opt = AdamW(model.named_parameters(trainable_only=True), lr=1e-4)
    xp = model.xp
    rng = np.random.default_rng(seed)
    idx = backend.asarray(rng.integers(0, BENCH.vocab_size, (BATCH, BENCH.context)), xp=xp)
    tgt = backend.asarray(rng.integers(0, BENCH.vocab_size, (BATCH, BENCH.context)), xp=xp)
    model.zero_grad()

    def step():
        loss, cache = model.loss(idx, tgt)
        model.loss_backward(cache)
        opt.step()
        model.zero_grad()
        backend.synchronize(xp)
    return step, model.num_parameters(True)


def _torch(lora: bool, seed=0):
    import torch
    from reference.torch_gpt import TorchGPT
    torch.manual_seed(seed)
    model = TorchGPT(BENCH.vocab_size, BENCH.context, BENCH.n_layer, BENCH.n_head, BENCH.d_model)
    for block in model.blocks:
        block.attn.use_sdpa = True   # the strongest torch baseline: fused causal attention
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS,
                                                 lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, BENCH.vocab_size, (BATCH, BENCH.context), generator=g)
    tgt = torch.randint(0, BENCH.vocab_size, (BATCH, BENCH.context), generator=g)

    def step():
        loss = model.loss(idx, tgt) if not lora else model.base_model.model.loss(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def matmul_gflops(size=2048, repeat=3) -> float:
    a = backend.host_normal(0, (size, size), dtype="float32", xp=backend.xp_default())
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ a
        backend.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _torch_worker(conn, steps: int) -> None:
    """A separate process for PyTorch: its OpenMP pool and our OpenBLAS threads never share
    the cores at the same time (in one process they measurably slowed each other)."""
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setups = {"torch full": _torch(False), "torch+peft lora": _torch(True)}
    conn.send({name: trainable for name, (_, trainable) in setups.items()})
    for fn, _ in setups.values():
        fn()
        fn()
    while True:
        name = conn.recv()
        if name is None:
            break
        time.sleep(PAUSE_S)
        start = time.perf_counter()
        for _ in range(steps):
            setups[name][0]()
        conn.send((time.perf_counter() - start) / steps)


def run_bench(steps: int = 10, rounds: int = 5, with_torch: bool | None = None) -> dict:
    backend.keep_freed_host_memory()   # as `lowrank` does for every command
    setups = {"ours full": _ours(False), "ours lora": _ours(True)}
    trainables = {name: t for name, (_, t) in setups.items()}
    if with_torch is None:
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            with_torch = True
        except ImportError:
            with_torch = False
            print("torch/peft not installed: comparing our two setups only "
                  "(pip install torch==2.13.0 && pip install -e \".[reference]\")")
    worker = None
    if with_torch:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        worker = ctx.Process(target=_torch_worker, args=(child, steps), daemon=True)
        worker.start()
        trainables.update(conn.recv())
    times = {name: [] for name in trainables}
    for fn, _ in setups.values():   # warm-up: allocations, BLAS threads
        fn()
        fn()
    for _ in range(rounds):   # interleaved: every setup sees the same machine noise
        for name in times:
            if name in setups:
                time.sleep(PAUSE_S)   # let the other side's threads stop spinning
                start = time.perf_counter()
                for _ in range(steps):
                    setups[name][0]()
                times[name].append((time.perf_counter() - start) / steps)
            else:
                conn.send(name)
                times[name].append(conn.recv())
    if worker is not None:
        conn.send(None)
        worker.join()
    peak = matmul_gflops()
    tokens = BATCH * BENCH.context
    print(f"bench config V={BENCH.vocab_size} d={BENCH.d_model} L={BENCH.n_layer} "
          f"H={BENCH.n_head} T={BENCH.context} B={BATCH} float32; LoRA r={RANK} on "
          f"{','.join(TARGETS)}; median of {rounds} interleaved rounds of {steps} steps "
          f"(PyTorch in its own process, taking turns)")
    print(f"large matmul (2048^3, float32): {peak:.1f} GFLOP/s")
    print(f"{'setup':<16} {'trainable':>10} {'ms/step':>9} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'% of matmul':>11}")
    result = {"matmul_gflops": peak}
    for name, trainable in trainables.items():
        sec = float(np.median(times[name]))
        flops = step_flops(BENCH, tokens, "lora" in name)
        result[name] = {"ms": sec * 1e3, "tokens_per_s": tokens / sec, "gflops": flops / sec / 1e9}
        print(f"{name:<16} {trainable:>10,} {sec * 1e3:9.1f} {tokens / sec:10,.0f} "
              f"{flops / sec / 1e9:8.1f} {100 * flops / sec / 1e9 / peak:10.1f}%")
    ours_ratio = result["ours lora"]["ms"] / result["ours full"]["ms"]
    print(f"\nours: LoRA step / full step = {ours_ratio:.3f} (target <= 0.75)")
    if with_torch:
        torch_ratio = result["torch+peft lora"]["ms"] / result["torch full"]["ms"]
        vs = result["ours lora"]["tokens_per_s"] / result["torch+peft lora"]["tokens_per_s"]
        vs_full = result["ours full"]["tokens_per_s"] / result["torch full"]["tokens_per_s"]
        print(f"torch: PEFT LoRA step / full step = {torch_ratio:.3f}")
        print(f"LoRA tokens/s, ours / PyTorch+PEFT = {vs:.2f}x (target >= 1.2); "
              f"full fine-tuning, ours / PyTorch = {vs_full:.2f}x")
    return result
