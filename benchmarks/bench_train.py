"""Full fine-tuning vs LoRA, ours vs PyTorch+PEFT (when installed), interleaved in one run.

    python benchmarks/bench_train.py [--steps 10] [--rounds 5] [--no-torch]

``lowrank bench`` runs our two setups alone; this script adds the PyTorch baseline
(``reference/torch_gpt.py``, the twin the tests check us against, with PEFT's LoRA) as a
worker process that takes its turn in every round (``lowrank.app.bench.run_bench``).
"""
import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # reference/ of this checkout

from lowrank.app.bench import (BATCH, BENCH, PAUSE_S, RANK, TARGETS, run_bench,  # noqa: E402
                               shard_name)


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


def torch_worker(conn, steps: int, threads=None) -> None:
    """PyTorch in its own process: its OpenMP pool and our OpenBLAS threads never share the
    cores at the same time (in one process they measurably slowed each other)."""
    import torch
    torch.set_num_threads(threads or max(1, torch.get_num_threads()))
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
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            setups[name][0]()
        conn.send(((time.perf_counter() - start) / steps,
                   (time.process_time() - start_cpu) / steps))


def torch_available() -> bool:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print("torch/peft not installed: comparing our two setups only "
              "(pip install torch==2.13.0 && pip install -e \".[reference]\")")
        return False
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--shards", type=int, default=None,
                        help="batch shards of our second pair of setups (default: the cores; "
                             "1: leave them out)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of both sides (default: each library's own)")
    args = parser.parse_args()
    with_torch = not args.no_torch and torch_available()
    if args.threads:
        from lowrank.backend import threads
        threads.set_threads(args.threads)
    baseline = functools.partial(torch_worker, threads=args.threads) if with_torch else None
    result = run_bench(args.steps, args.rounds, baseline=baseline, shards=args.shards)
    if with_torch:
        torch_ratio = result["torch+peft lora"]["ms"] / result["torch full"]["ms"]
        print(f"torch: PEFT LoRA step / full step = {torch_ratio:.3f}")
        k = result["shards"]
        for full, lora in (("ours full", "ours lora"), (shard_name("full", k), shard_name("lora", k))):
            if lora not in result:
                continue
            vs = result[lora]["tokens_per_s"] / result["torch+peft lora"]["tokens_per_s"]
            vs_full = result[full]["tokens_per_s"] / result["torch full"]["tokens_per_s"]
            cpu_vs = result["torch+peft lora"]["cpu_ms"] / result[lora]["cpu_ms"]
            print(f"{lora}: LoRA tokens/s / PyTorch+PEFT's = {vs:.2f}x (target >= 1.5) "
                  f"{'met' if vs >= 1.5 else 'NOT met'}; in CPU time per step {cpu_vs:.2f}x; "
                  f"full fine-tuning / PyTorch's = {vs_full:.2f}x")
