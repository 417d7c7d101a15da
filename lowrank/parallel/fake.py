"""K ranks as threads of one process, for tests: ``FakeWorld(2).run(fn)``.

Collectives meet at a ``threading.Barrier``; reductions add in rank order, so every rank gets
bit-identical results, as MPI and NCCL give. ``world.log`` records every collective.
"""
from __future__ import annotations

import copy
import threading

from .. import backend
from .comm import Comm, _host_copy, _write_back, np


class FakeWorld:
    """``size`` ranks simulated by threads of this process: ``FakeWorld(2).run(fn)`` calls
    ``fn(comm)`` on each rank's ``FakeComm`` in its own thread and returns the results in
    rank order (re-raising the first rank's exception). Reductions add in rank order, so
    every rank gets bit-identical results, as MPI and NCCL give."""

    def __init__(self, size: int, timeout: float = 30.0):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots = [None] * size
        self.log = []     # (rank, collective, nbytes) of every collective, for tests

    def comms(self) -> list:
        return [FakeComm(self, rank) for rank in range(self.size)]

    def run(self, fn) -> list:
        results, errors = [None] * self.size, [None] * self.size

        def target(comm):
            try:
                results[comm.rank] = fn(comm)
            except BaseException as exc:   # noqa: BLE001 - re-raised below
                errors[comm.rank] = exc
                self._barrier.abort()
        threads = [threading.Thread(target=target, args=(c,)) for c in self.comms()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for exc in errors:
            if exc is not None and not isinstance(exc, threading.BrokenBarrierError):
                raise exc
        for exc in errors:
            if exc is not None:
                raise exc
        return results


class FakeComm(Comm):
    kind = "fake"

    def __init__(self, world: FakeWorld, rank: int):
        self.world, self.rank, self.size = world, rank, world.size

    def _exchange(self, name: str, value, nbytes: int = 0) -> list:
        self.world.log.append((self.rank, name, nbytes))
        self.world._slots[self.rank] = value
        self.world._barrier.wait()
        values = list(self.world._slots)
        self.world._barrier.wait()
        return values

    def allreduce_sum(self, buf):
        host = _host_copy(buf)
        values = self._exchange("allreduce", host, host.nbytes)
        total = values[0].copy()
        for v in values[1:]:
            total += v
        _write_back(buf, total)
        return buf

    def broadcast(self, obj, root: int = 0):
        value = self._exchange("broadcast", obj if self.rank == root else None)[root]
        if self.rank == root:
            return obj
        try:
            backend.backend_of(obj)
        except ValueError:
            return copy.deepcopy(value)
        _write_back(obj, _host_copy(value))
        return obj

    def allgather(self, obj) -> list:
        return [copy.deepcopy(v) for v in self._exchange("allgather", obj)]

    def barrier(self) -> None:
        self._exchange("barrier", None)

    def _allreduce_max_int(self, ints):
        return np.maximum.reduce(self._exchange("checksum comparison", ints, ints.nbytes))

    def abort(self, message: str, code: int = 1):
        self.world._barrier.abort()
        raise RuntimeError(f"rank {self.rank} aborted: {message}")


__all__ = ["FakeWorld", "FakeComm"]
