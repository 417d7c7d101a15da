"""Data parallel: bytes all-reduced per step (LoRA vs full fine-tuning) and tokens/s with 1 vs
2 processes (this script starts itself under ``mpiexec -n 2``).

    python benchmarks/bench_parallel.py [--steps 8] [--warmup 2]

Config: GPTConfig(vocab_size=1024, context=128, n_layer=4, n_head=4, d_model=256), global batch
B = 8, float32, NumPy backend, synthetic tokens (data loading is not what is measured). LoRA:
r = 8 on q, k, v, o, fc1, fc2. Processes get one BLAS thread each unless --threads says more;
the single process is also run with the machine's default threading for reference.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=1024, context=128, n_layer=4, n_head=4, d_model=256)
BATCH = 8
TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class RandomTokens:
    context = CONFIG["context"]

    def batch(self, split, batch_size, rng):
        x = rng.integers(0, CONFIG["vocab_size"], (batch_size, self.context))
        return x, np.roll(x, -1, axis=1)


def build(mode):
    import lowrank as lr
    model = lr.GPT(lr.GPTConfig(**CONFIG), seed=0, dtype="float32")
    if mode == "lora":
        lr.adapters.inject(model, lr.adapters.config("lora", r=8, alpha=16), TARGETS)
    return model


def bytes_per_step(mode) -> dict:
    from lowrank.parallel import GradientAllReduce, SingleProcess
    model = build(mode)
    model.zero_grad()
    sync = GradientAllReduce(model, SingleProcess())
    sync.allreduce([0.0])
    trainable = sum(p.data.size for p in model.parameters(trainable_only=True))
    return {"mode": mode, "trainable": int(trainable), "total": int(model.num_parameters()),
            "bytes": sync.bytes_per_step}


def worker(mode, steps, warmup) -> None:
    """One measurement (under mpiexec or alone); rank 0 prints one JSON line."""
    from lowrank.parallel import get_comm
    from lowrank.training.trainer import Trainer, TrainConfig
    comm = get_comm("auto")
    trainer = Trainer(build(mode), RandomTokens(), TrainConfig(steps=steps + warmup,
                      batch_size=BATCH, lr=1e-3, warmup=1), comm=comm, check_every=0)
    reduce_seconds = []
    if trainer.grad_sync is not None:        # time the collective itself
        inner = comm.allreduce_sum

        def timed(buf):
            start = time.perf_counter()
            inner(buf)
            reduce_seconds.append(time.perf_counter() - start)
            return buf
        comm.allreduce_sum = timed
    records = [trainer.train_step() for _ in range(steps + warmup)][warmup:]
    check = float("nan")
    if trainer.grad_sync is not None:
        start = time.perf_counter()
        trainer.grad_sync.check_drift(trainer.step, trainer._probe())
        check = time.perf_counter() - start
    step_s = statistics.median(r["seconds"] for r in records)
    if comm.is_root:
        print("RESULT " + json.dumps({
            "mode": mode, "processes": comm.size, "comm": comm.kind,
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "tokens_per_s": BATCH * CONFIG["context"] / step_s, "step_s": step_s,
            "allreduce_s": statistics.median(reduce_seconds[warmup:]) if reduce_seconds else 0.0,
            "allreduce_bytes": records[-1].get("allreduce_bytes", 0),
            "drift_check_s": check}), flush=True)


def run(command, threads) -> dict:
    env = dict(os.environ)
    for var in THREAD_VARS:
        if threads is None:
            env.pop(var, None)
        else:
            env[var] = str(threads)
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per process")
    parser.add_argument("--worker", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return

    print(f"config {CONFIG}, B={BATCH}, float32; LoRA r=8 on {','.join(TARGETS)}\n")
    print("| fine-tuning | trainable params | all-reduced per step |")
    print("|---|---:|---:|")
    sizes = {m: bytes_per_step(m) for m in ("lora", "full")}
    for m, s in sizes.items():
        print(f"| {m} | {s['trainable']:,} of {s['total']:,} | {s['bytes']:,} B |")
    print(f"\nLoRA sends {sizes['full']['bytes'] / sizes['lora']['bytes']:.1f}x fewer bytes "
          "(the flat buffer: trainable gradients + the loss)\n")

    me = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps),
          "--warmup", str(args.warmup)]
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    print("| fine-tuning | processes | BLAS threads each | tokens/s | step ms | "
          "all-reduce ms | drift check ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in ("lora", "full"):
        rows = [run([*me, "--worker", mode], None), run([*me, "--worker", mode], args.threads)]
        if mpiexec:
            rows.append(run([mpiexec, "-n", "2", *me, "--worker", mode], args.threads))
        for r in rows:
            print(f"| {mode} | {r['processes']} ({r['comm']}) | {r['threads']} | "
                  f"{r['tokens_per_s']:,.0f} | {1e3 * r['step_s']:.1f} | "
                  f"{1e3 * r['allreduce_s']:.2f} | {1e3 * r['drift_check_s']:.1f} |")
        if len(rows) == 3:
            print(f"| {mode}: 2 vs 1 process ({args.threads} thread each) | | | "
                  f"{rows[2]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x | | | |")
    if not mpiexec:
        print("\n(no mpiexec: install the `mpi` extra for the 2-process figures)")


if __name__ == "__main__":
    main()
