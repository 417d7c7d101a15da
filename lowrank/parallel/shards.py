"""Data parallel over the cores of one process: a batch's rows split over Python threads
(docs/performance.md#batch-shards).

NumPy runs its elementwise work (GELU, LayerNorm, softmax, dropout) on one core; only the
matrix products use BLAS's threads. ``BatchShards(model, shards=K)`` instead runs K
forward/backward passes at once, each on a contiguous share of the batch's rows, each with
single-threaded BLAS, in K threads: NumPy releases the GIL inside every array operation,
so the elementwise work runs on K cores too. Shard 0 runs on the model itself; shards
1..K-1 run on *replicas* rebuilt every call: every module shallow-copied, every Parameter
a new one around the *same* data array with a gradient of its own. After the threads join,
the replicas' gradients are added into the model's in shard order, so the result is
deterministic and equals one pass over the whole batch up to the order of the sums.

The loss is a mean over its terms (rows, tokens, or a chat's labelled tokens: a batch's
``loss_terms``), so shard k's backward is weighted by ``terms_k / terms`` and the reported
loss is the same weighted sum. Dropout: shard 0 draws from the model's streams;
a replica's stream (each ``backend.DeviceRNG``) is seeded from the model's stream it
replaces, so masks differ from a one-thread run but a rerun gives the same bits. A module
whose backward keeps state besides gradients (IncreLoRA's ∂L/∂ΔW) says how to merge it:
``Module.reset_replica_state()`` and ``Module.absorb_replica(replica)``.

NumPy only: a GPU runs one batch at full width already (CuPy and numpy-strict refuse).
With K > 1 the constructor calls ``backend.keep_freed_host_memory()`` and
``backend.one_malloc_arena()`` (process-wide): a worker thread's own malloc arena would hand
its memory back to the OS after every step and fault it in again (7–11 ms of system time a
bench step).
"""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor, wait

from threadpoolctl import threadpool_limits

from .. import backend
from ..nn.module import Module, Parameter


class BatchShards:
    def __init__(self, model, shards: int):
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
        if shards > 1 and backend.backend_of(model.parameters()[0].data) != "numpy":
            raise ValueError("shards > 1 needs the numpy backend (a GPU runs the whole batch "
                             "at once; numpy-strict stands for the GPU)")
        self.model, self.shards = model, shards
        self._pool = None
        if shards > 1:   # before the workers exist: their blocks then come from the kept heap
            backend.keep_freed_host_memory()
            backend.one_malloc_arena()

    def bounds(self, rows: int) -> list[tuple[int, int]]:
        """Contiguous ``(start, stop)`` row ranges, as even as possible, none empty."""
        k = max(1, min(self.shards, rows))
        cuts = [rows * i // k for i in range(k + 1)]
        return list(zip(cuts[:-1], cuts[1:]))

    def split(self, *arrays) -> list:
        """``[(rows_k, (a[start:stop] for a in arrays))]``: the parts ``loss_backward`` takes,
        for ``model.loss`` over row-major arrays (token ids and targets)."""
        return [(stop - start, tuple(a[start:stop] for a in arrays))
                for start, stop in self.bounds(int(arrays[0].shape[0]))]

    def loss_backward(self, parts, dloss: float = 1.0) -> float:
        """``parts``: per shard ``(terms_k, args)`` with ``model.loss(*args)`` a mean over
        ``terms_k`` terms (``split`` gives rows); runs every shard's loss and backward (weighted
        ``dloss · terms_k / terms``), adds the replicas' gradients into the model's, returns
        the batch's mean loss."""
        if not 1 <= len(parts) <= self.shards:
            raise ValueError(f"{len(parts)} parts for {self.shards} shards")
        terms = sum(n for n, _ in parts)
        weights = [n / terms for n, _ in parts]
        replicas = [replicate(self.model) for _ in parts[1:]]
        models = [self.model] + replicas

        def run(i):
            loss, cache = models[i].loss(*parts[i][1])
            models[i].loss_backward(cache, dloss=dloss * weights[i])
            return loss

        if len(parts) == 1:
            return run(0)
        if self._pool is None:   # shards - 1 workers; the calling thread runs shard 0
            self._pool = ThreadPoolExecutor(self.shards - 1, thread_name_prefix="lowrank-shard")
        with threadpool_limits(1, user_api="blas"):   # K threads, each one core of BLAS
            futures = [self._pool.submit(run, i) for i in range(1, len(parts))]
            try:
                first = run(0)
            finally:   # no shard may still run when this returns or raises
                wait(futures)
            losses = [first] + [f.result() for f in futures]
        for replica in replicas:
            absorb(self.model, replica)
        return sum(w * loss for w, loss in zip(weights, losses))


def replicate(model: Module) -> Module:
    """A replica of ``model``: modules shallow-copied, trainable parameters sharing data with
    fresh (empty) gradients, frozen ones shared whole, dropout streams seeded from the
    model's."""
    memo = {}

    def clone(module):
        if id(module) in memo:
            return memo[id(module)]
        twin = copy.copy(module)
        memo[id(module)] = twin
        for name, value in vars(module).items():
            setattr(twin, name, _clone_value(value, clone, memo))
        twin.reset_replica_state()
        return twin
    return clone(model)


def _clone_value(value, clone, memo):
    if isinstance(value, Module):
        return clone(value)
    if isinstance(value, Parameter):
        if not value.trainable:     # never written: shared as is (a quantized base stays so)
            return value
        if id(value) not in memo:   # tied weights stay tied
            memo[id(value)] = Parameter(value.data, trainable=value.trainable)
        return memo[id(value)]
    if isinstance(value, backend.DeviceRNG):
        return value.spawn()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
        return type(value)(clone(v) for v in value)
    return value


def absorb(model: Module, replica: Module) -> None:
    """Add the replica's gradients into the model's (same parameter order), then whatever
    else its modules' backward kept (``absorb_replica``)."""
    for (name, p), (_, q) in zip(model.named_parameters(), replica.named_parameters()):
        if q.grad is not None:
            p.accumulate(q.grad)
    for (_, m), (_, r) in zip(model.named_modules(), replica.named_modules()):
        m.absorb_replica(r)


__all__ = ["BatchShards", "replicate", "absorb"]
