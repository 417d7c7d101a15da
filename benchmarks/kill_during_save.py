"""Kill a process while it saves, many times; every directory must still load one whole save.

A child process saves in a loop into two directories: a full model (``save_model`` with its
training state) and an adapter (``save_adapter`` with its training state), where save number i
fills every parameter and every optimizer moment with i. The parent SIGKILLs it at a random
moment, then loads both directories: each must load (integrity records checked) and hold one
save — parameters, moments and step all equal to the same i, no older than the last save the
child reported. Also counted: temporary files a killed save left, and whether the next save
removed them.

    python benchmarks/kill_during_save.py --trials 100
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _model():
    from lowrank import adapters
    from lowrank.models import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=2000, context=32, n_layer=2, n_head=4, d_model=64), seed=0)
    full = GPT(GPTConfig(vocab_size=2000, context=32, n_layer=2, n_head=4, d_model=64), seed=0)
    adapters.inject(model, adapters.config("lora", r=8), ["q", "v", "fc1"])
    return full, model


def _fill(model, i, trainable_only):
    state = {}
    for name, p in model.named_parameters(trainable_only=trainable_only):
        p.data[...] = i
        state[name] = {"step": i, "exp_avg": np.full(p.shape, float(i)),
                       "exp_avg_sq": np.full(p.shape, float(i))}
    return {"step": i, "optimizer": {"state": state}, "rng": {"seed": i}}


def child(directory: Path, start: int) -> None:
    from lowrank.formats import checkpoint
    full, adapted = _model()
    i = start
    while True:
        i += 1
        checkpoint.save_model(full, directory / "full", train_state=_fill(full, i, False))
        checkpoint.save_adapter(adapted, directory / "adapter",
                                train_state=_fill(adapted, i, True))
        print(f"saved {i}", flush=True)


def check(directory: Path, last: int) -> str | None:
    """``None`` if both directories hold one whole save no older than ``last``; else why."""
    from lowrank.formats import checkpoint
    full, adapted = _model()
    for name, model, trainable in (("full", full, False), ("adapter", adapted, True)):
        d = directory / name
        try:
            if name == "full":
                checkpoint.load_weights(model, d)
            else:
                checkpoint.load_adapter(adapted, d)
            state = checkpoint.load_training_state(d)
        except (ValueError, FileNotFoundError) as exc:
            return f"{name}: {exc}"
        values = {float(v) for _, p in model.named_parameters(trainable_only=trainable)
                  for v in np.unique(p.data)}
        moments = {float(v) for s in state["optimizer"]["state"].values()
                   for v in np.unique(np.concatenate([s["exp_avg"].ravel(),
                                                      s["exp_avg_sq"].ravel()]))}
        if len(values) != 1 or values != moments or {state["step"]} != {int(v) for v in values}:
            return f"{name}: mixed saves: parameters {sorted(values)[:4]}, moments " \
                   f"{sorted(moments)[:4]}, step {state['step']}"
        if state["step"] < last:
            return f"{name}: holds save {state['step']}, older than the reported {last}"
    return None


def temporaries(directory: Path) -> set:
    """Temporary and versioned files (``.model.safetensors.<random>.lowrank-tmp``,
    ``model.<save id>.safetensors``) in the save directories."""
    return {p for p in directory.rglob("*") if p.name.endswith(".lowrank-tmp")
            or p.name.count(".") >= 2 and len(p.name.split(".")[-2]) == 32}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--dir", default=None, help="where to save (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.dir or tempfile.mkdtemp(prefix="kill-during-save-"))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    corrupt, left, cleaned, last, leftovers = 0, 0, 0, 0, set()
    for trial in range(args.trials):
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(root), str(last)],
                                stdout=subprocess.PIPE, text=True, env=env)
        first = proc.stdout.readline()        # one whole save first: a kill then lands later
        if not first.startswith("saved"):
            proc.kill()
            raise SystemExit(f"child failed to save: {first!r}")
        if leftovers and not leftovers & temporaries(root):
            cleaned += 1                        # the save after a kill removed its leftovers
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        rest = proc.communicate()[0]
        last = max(int(line.split()[1]) for line in [first, *rest.splitlines()]
                   if line.startswith("saved "))
        leftovers = temporaries(root)
        left += bool(leftovers)
        problem = check(root, last)
        if problem:
            corrupt += 1
            print(f"trial {trial}: {problem}")
    print(f"kill during save: corrupt {corrupt} of {args.trials} trials; a kill left "
          f"temporary or versioned files in {left}; the next save removed all of them in "
          f"{cleaned} of the {left - bool(leftovers)} that had a next save ({root})")
    sys.exit(1 if corrupt else 0)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
