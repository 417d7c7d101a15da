"""Training beside another job: wall and CPU seconds of a LoRA step, per thread, quiet and
beside a 2-thread PyTorch job (docs/performance.md#shared-machines).

    python benchmarks/bench_shared_cpu.py [--steps 6] [--setups all|lowrank|minilm|torch]

Each setting runs in a fresh process (OpenBLAS reads its thread count and its waiting time
when it loads): the LoRA step of ``lowrank bench`` (GPT d=256, L=4, T=128, B=8, r=8 on six
linears) with 1 or 2 BLAS threads, OpenBLAS's default waiting or
``OPENBLAS_THREAD_TIMEOUT=4`` (its shortest: 2^4 cycles), and 2 batch shards of one thread
each; MiniLM's classification step (the recipe's LoRA, batch 32) with 1 or 2 threads or 2
shards; the GPT step in PyTorch+PEFT with 1 or 2 threads, OpenMP's default waiting or
``OMP_WAIT_POLICY=passive``. "beside" starts a PyTorch job with 2 threads (an MLP training
loop) before the setting and stops it after. Reported per setting: wall ms/step, CPU
ms/step of the whole process, and of the worker threads alone (``/proc/self/task/*/stat``):
a worker that burns a core while it waits shows CPU close to the wall time.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")

LOWRANK = {   # name -> (environment, --threads, --shards)
    "lowrank 1 thread": ({}, 1, 1),
    "lowrank 2 threads": ({}, 2, 1),
    "lowrank 2 threads, timeout 4": ({"OPENBLAS_THREAD_TIMEOUT": "4"}, 2, 1),
    "lowrank 2 shards x 1 thread": ({}, 1, 2),
}
MINILM = {   # the classification recipe's LoRA step (batch 32 of the shipped sentences)
    "minilm 1 thread": ({}, 1, 1),
    "minilm 2 threads": ({}, 2, 1),
    "minilm 2 shards x 1 thread": ({}, 1, 2),
}
TORCH = {
    "torch+peft 1 thread": ({}, 1, 1),
    "torch+peft 2 threads": ({}, 2, 1),
    "torch+peft 2 threads, passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2, 1),
}


def thread_seconds() -> dict:
    """CPU seconds (user + system) of each thread of this process, by thread id."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:        # a thread that ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def _lowrank_step(threads: int, shards: int):
    sys.path.insert(0, str(ROOT))
    from lowrank.backend import threads as blas
    from lowrank.app.bench import _ours
    blas.set_threads(threads)
    step, _ = _ours(True, shards=shards)
    return step


def _minilm_step(threads: int, shards: int):
    sys.path.insert(0, str(ROOT))
    from lowrank.backend import threads as blas
    from lowrank.tasks import classify, classify_io
    from lowrank.tasks.text_data import TextData, label_names
    from lowrank.training.trainer import TrainConfig, hooks_for
    blas.set_threads(threads)
    train, _ = classify_io.load_examples()
    train = train[:256]
    config = classify.ClassifyConfig()
    clf, tok = classify_io.build("minilm", 2, config)
    classify.prepare(clf, "lora")
    data = TextData.from_examples(tok, {"train": train}, label_names(train), config.max_length)
    trainer = classify.ClassifierTrainer(
        clf, data, TrainConfig(steps=10**6, batch_size=32, lr=5e-4, warmup=0, shards=shards),
        hooks=hooks_for(clf))
    return trainer.train_step


def _torch_step(threads: int):
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(threads)
    from bench_train import _torch
    step, _ = _torch(True)
    return step


def worker(kind: str, threads: int, shards: int, steps: int) -> dict:
    """One setting in this process: warm up, then time ``steps`` steps."""
    step = {"lowrank": lambda: _lowrank_step(threads, shards),
            "minilm": lambda: _minilm_step(threads, shards),
            "torch": lambda: _torch_step(threads)}[kind]()
    step()
    step()
    before, cpu0, t0 = thread_seconds(), time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = thread_seconds()
    main = os.getpid()
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    others = sorted((v for tid, v in used.items() if tid != main), reverse=True)
    return {"wall_ms": 1e3 * wall / steps, "cpu_ms": 1e3 * cpu / steps,
            "main_ms": 1e3 * used.get(main, 0.0) / steps,
            "busiest_worker_ms": 1e3 * (others[0] if others else 0.0) / steps}


def other_job(seconds: float) -> None:
    """The neighbour: a PyTorch MLP training loop on 2 threads, for ``seconds``."""
    import torch
    torch.set_num_threads(2)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(),
                                torch.nn.Linear(2048, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 512)
    end = time.time() + seconds
    while time.time() < end:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def run_setting(name, kind, env, threads, shards, steps, beside) -> dict:
    neighbour = None
    if beside:
        neighbour = subprocess.Popen([sys.executable, __file__, "--other-job", "600"])
        time.sleep(2.0)                  # the neighbour's threads are running
    try:
        cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads),
               "--shards", str(shards), "--steps", str(steps)]
        environ = {**os.environ, "OMP_NUM_THREADS": str(threads), **env}
        result = subprocess.run(cmd, env=environ, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        if neighbour is not None:
            neighbour.terminate()
            neighbour.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    ap.add_argument("--setups", choices=("all", "lowrank", "minilm", "torch"),
                    default="lowrank", help="which steps to measure")
    ap.add_argument("--worker", choices=("lowrank", "minilm", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--other-job", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.other_job is not None:
        return other_job(args.other_job)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.shards, args.steps)))
        return
    settings = {**(LOWRANK if args.setups in ("all", "lowrank") else {}),
                **(MINILM if args.setups in ("all", "minilm") else {}),
                **(TORCH if args.setups in ("all", "torch") else {})}
    print(f"{'setting':<32} {'where':<7} {'wall ms':>8} {'CPU ms':>8} {'main ms':>8} "
          f"{'busiest worker ms':>18}   (per step, {args.steps} steps; "
          f"load average {os.getloadavg()[0]:.1f})", flush=True)
    for name, (env, threads, shards) in settings.items():
        kind = name.split()[0].split("+")[0]
        kind = {"torch": "torch", "minilm": "minilm"}.get(kind, "lowrank")
        quiet = None
        for beside in (False, True):
            r = run_setting(name, kind, env, threads, shards, args.steps, beside)
            quiet = r["wall_ms"] if not beside else quiet
            ratio = f"  {r['wall_ms'] / quiet:.2f}x quiet" if beside else ""
            print(f"{name:<32} {'beside' if beside else 'quiet':<7} {r['wall_ms']:8.0f} "
                  f"{r['cpu_ms']:8.0f} {r['main_ms']:8.0f} {r['busiest_worker_ms']:18.0f}"
                  f"{ratio}", flush=True)


if __name__ == "__main__":
    main()
