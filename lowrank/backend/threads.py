"""How many threads the CPU math libraries (OpenBLAS/MKL, OpenMP) may use
(docs/performance.md#threads).

Every BLAS library starts as many threads as the machine has cores. Under ``mpiexec -n K``
each of the K ranks does so, and K·cores threads then fight over the cores: a spinning
OpenBLAS thread that loses its core stalls every GEMM it is part of (on a 2-core machine
with one other busy job, a bench step took 3.4 s with 2 threads against 0.4 s with 1).
``default_threads()`` therefore gives each local rank its share of the cores this
process may run on; ``set_threads(n)`` applies a count through threadpoolctl (an optional
dependency: without it the call reports that nothing was set).
"""
from __future__ import annotations

import os

# Launchers' environment variables naming how many ranks share this node (MPICH/Hydra,
# Open MPI, Slurm), then the world size (PMI) when no local count is given.
LOCAL_RANK_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE",
                   "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")

_limiter = None   # the threadpoolctl limiter in force


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_ranks(environ=None) -> int:
    """How many processes of a parallel launch share this machine (1 when not launched)."""
    environ = os.environ if environ is None else environ
    for var in LOCAL_RANK_VARS:
        value = environ.get(var, "")
        if value.strip().isdigit() and int(value) >= 1:
            return int(value)
    return 1


def default_threads(environ=None, cores: int | None = None) -> int:
    """``cores // local ranks`` (at least 1): each rank of a parallel run gets its share."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // local_ranks(environ))


def check_threads(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an integer >= 1, got {n!r}")
    return n


def set_threads(n: int | None = None) -> bool:
    """Limit the BLAS/OpenMP pools of this process to ``n`` threads (``None``: the default
    above). Returns False when threadpoolctl is not installed (nothing was changed)."""
    global _limiter
    n = default_threads() if n is None else check_threads(n)
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    _limiter = ThreadpoolController().limit(limits=n)   # holds until replaced
    return True


def thread_info() -> list[dict]:
    """``[{"library", "api", "threads", "kernel"}]`` for each loaded pool (empty without
    threadpoolctl): which BLAS runs, with how many threads, on which kernel."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{"library": info.get("internal_api"), "api": info.get("user_api"),
             "threads": info.get("num_threads"), "kernel": info.get("architecture")}
            for info in threadpool_info()]


USER_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
CLI_THREADS = 1   # the command line's BLAS pool (docs/performance.md#shared-machines)


def apply_cli_default(environ=None) -> int | None:
    """The command line's default: one BLAS thread per process, unless the environment
    names a count (the user chose). OpenBLAS's idle workers spin between products, and on a
    machine shared with other jobs a two-thread pool cost several times the CPU and wall
    time of one; more cores come from ``--shards`` (threads that sleep while they wait) or
    ``--threads N``. Returns the count applied (None: nothing changed)."""
    environ = os.environ if environ is None else environ
    if any(environ.get(v) for v in USER_VARS):
        return None
    return CLI_THREADS if set_threads(CLI_THREADS) else None


def apply_default_under_launcher(environ=None) -> int | None:
    """When started by a parallel launcher (more than one local rank) and no thread count
    was set in the environment, apply ``default_threads()``; returns the count applied."""
    environ = os.environ if environ is None else environ
    if local_ranks(environ) <= 1:
        return None
    if any(environ.get(v) for v in USER_VARS):
        return None   # the user chose
    n = default_threads(environ)
    return n if set_threads(n) else None
