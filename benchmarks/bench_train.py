"""Full fine-tuning vs LoRA, ours vs PyTorch+PEFT (when installed), interleaved in one run.

    python benchmarks/bench_train.py [--steps 10] [--rounds 5]     (same as `lowrank bench`)
"""
import argparse

from lowrank.bench import run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    run_bench(args.steps, args.rounds, with_torch=False if args.no_torch else None)
