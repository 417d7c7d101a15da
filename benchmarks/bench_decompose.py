"""Exact vs randomized ``svd_split`` side by side (docs/decompose.md#svd-split).

For matrices with a decaying spectrum (σ_i = i^-decay) it reports, per shape and rank:
the time of each method (best of ``--repeat``), the speed-up, and the randomized residual's
Frobenius norm over the optimal (exact) one. A large matmul timed in the same run gives the
machine's achievable GFLOP/s for scale.

    python benchmarks/bench_decompose.py [--dtype float32] [--backend numpy] [--n-iter 4]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lowrank import backend
from lowrank.nn.decompose import svd_split


def decaying_matrix(m, n, decay, seed):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    Q1, _ = np.linalg.qr(rng.standard_normal((m, k)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (Q1 * np.arange(1, k + 1) ** -decay) @ Q2.T


def best_time(fn, repeat, xp):
    best, out = float("inf"), None
    for _ in range(repeat):
        backend.synchronize(xp)
        start = time.perf_counter()
        out = fn()
        backend.synchronize(xp)
        best = min(best, time.perf_counter() - start)
    return best, out


def matmul_gflops(xp, dtype, repeat, size=2048):
    a = backend.host_normal(0, (size, size), dtype=dtype, xp=xp)
    seconds, _ = best_time(lambda: a @ a, repeat, xp)
    return 2 * size**3 / seconds / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=backend.FLOAT_DTYPES)
    parser.add_argument("--backend", default="numpy", choices=backend.BACKENDS)
    parser.add_argument("--shapes", default="1024x1024,4096x1024")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--n-iter", type=int, default=4)
    parser.add_argument("--decay", type=float, default=1.0, help="σ_i = i^-decay")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    xp = backend.namespace(args.backend)
    print(f"backend {args.backend}, {args.dtype}, spectrum σ_i = i^-{args.decay:g}, "
          f"oversample {args.oversample}, power iterations {args.n_iter}")
    print(f"large matmul (2048^3): {matmul_gflops(xp, args.dtype, args.repeat):.1f} GFLOP/s")
    header = (f"{'shape':>10} {'r':>4} {'exact s':>9} {'random s':>9} {'speed-up':>9} "
              f"{'resid/opt':>10}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        m, n = map(int, shape.split("x"))
        W = backend.asarray(decaying_matrix(m, n, args.decay, seed=0).astype(args.dtype), xp=xp)
        for r in map(int, args.ranks.split(",")):
            t_exact, exact = best_time(lambda: svd_split(W, r, "exact"), args.repeat, xp)
            t_rand, rand = best_time(
                lambda: svd_split(W, r, "randomized", oversample=args.oversample,
                                  n_iter=args.n_iter, seed=1), args.repeat, xp)
            optimal = float(xp.linalg.norm(exact.residual))
            ratio = float(xp.linalg.norm(rand.residual)) / optimal
            print(f"{shape:>10} {r:>4} {t_exact:9.4f} {t_rand:9.4f} {t_exact / t_rand:8.1f}x "
                  f"{ratio:10.5f}")


if __name__ == "__main__":
    main()
