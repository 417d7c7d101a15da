"""Communicators for data-parallel training: one small interface, four implementations.

Every communicator has ``rank``, ``size`` and

* ``allreduce_sum(buf)``  — sum a contiguous array over all ranks, in place (any backend);
* ``broadcast(obj, root)`` — an array (in place) or any picklable object, from ``root``;
* ``allgather(obj)``       — the list of every rank's ``obj``;
* ``barrier()``;
* ``disagreement(values)`` — a host bool mask: where a float64 vector is not bit-identical
  on every rank (the parameter-drift check); ``checksum_agree(values)`` is ``not any``;
* ``abort(message, code)`` — print the message and stop *every* rank.

Implementations: ``SingleProcess`` (no-op), ``MPIComm`` (mpi4py, host buffers through the
buffer protocol; device arrays are staged through the host), ``NCCLComm`` (CuPy: device
buffers on the current stream; host work goes to its MPI communicator) and ``FakeComm``
(``fake.py``: K ranks as threads of one process, for tests). ``get_comm("auto")`` picks one.

Failure handling. Under MPICH's ``mpiexec`` (hydra) a rank that dies (SIGKILL, segfault)
makes hydra kill the others within about a second and print ``BAD TERMINATION ... KILLED BY
SIGNAL``; a rank that *raises* would instead leave the others blocked in their next
collective, so an MPI job aborts the world on any uncaught exception (``sys.excepthook``)
and the CLI aborts on errors. A watchdog thread aborts a rank whose host collective has
waited ``LOWRANK_COMM_TIMEOUT`` seconds (default 300, 0 disables) for a hung peer.

mpi4py is imported lazily (extra ``mpi``); CuPy only through ``lowrank.backend``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from .. import backend

np = backend.namespace("numpy")   # host-side buffers only (staging, checksums)

COMM_KINDS = ("auto", "none", "mpi", "nccl")
# launchers' world-size variables: MPICH/Intel MPI (hydra), Open MPI, MVAPICH
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
DEFAULT_TIMEOUT = 300.0


def _host_copy(buf):
    return np.array(backend.to_numpy(buf), copy=True, order="C")


def _write_back(buf, host) -> None:
    """Copy the host result into ``buf`` (a host array, or a device array of any backend)."""
    if isinstance(buf, np.ndarray):
        buf[...] = host
    else:
        buf[...] = backend.asarray(host, xp=backend.get_namespace(buf))


def _bits(values):
    """float64 values as int64 bit patterns: equal bits <=> identical values (NaN, -0.0 too)."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64)).view(np.int64)


class Comm:
    """The single-process communicator: every collective is the identity."""

    kind = "none"
    rank = 0
    size = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, buf):
        return buf

    def broadcast(self, obj, root: int = 0):
        return obj

    def allgather(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def _allreduce_max_int(self, ints):
        """Element-wise max over ranks of an int64 host vector (one collective)."""
        return ints

    def disagreement(self, values):
        """Host bool mask of the entries of a float64 vector that differ between ranks:
        one MAX all-reduce of the bit patterns and their complements (max of ~b is ~min b)."""
        bits = _bits(values)
        both = self._allreduce_max_int(np.concatenate([bits, ~bits]))
        high, low = both[:bits.size], ~both[bits.size:]
        return low != high

    def checksum_agree(self, values) -> bool:
        return not bool(self.disagreement(values).any())

    def abort(self, message: str, code: int = 1):
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)


class SingleProcess(Comm):
    pass


# --- MPI -------------------------------------------------------------------------------------

def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("data-parallel training over MPI needs mpi4py: install the extra "
                           "with `pip install -e \".[mpi]\"` (mpi4py and an MPI such as the "
                           f"`mpich` wheel) ({type(exc).__name__}: {exc})") from exc
    return MPI


class MPIComm(Comm):
    """mpi4py's ``COMM_WORLD`` (or ``mpi_comm``); host NumPy buffers in place."""

    kind = "mpi"

    def __init__(self, mpi_comm=None, timeout: float | None = None):
        self.MPI = _import_mpi()
        self.comm = self.MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        if timeout is None:
            timeout = float(os.environ.get("LOWRANK_COMM_TIMEOUT", DEFAULT_TIMEOUT))
        self.timeout = float(timeout)
        self._waiting = None            # (collective name, start time) while in one
        if self.size > 1:
            _abort_on_uncaught_exception(self)
            if self.timeout > 0:
                threading.Thread(target=self._watchdog, daemon=True,
                                 name="lowrank-comm-watchdog").start()

    @contextlib.contextmanager
    def _collective(self, name: str):
        self._waiting = (name, time.monotonic())
        try:
            yield
        finally:
            self._waiting = None

    def _watchdog(self) -> None:
        tick = min(1.0, self.timeout / 4)
        while True:
            time.sleep(tick)
            waiting = self._waiting
            if waiting is not None and time.monotonic() - waiting[1] > self.timeout:
                self.abort(f"lowrank: {waiting[0]} waited more than {self.timeout:g} s for the "
                           "other ranks: one of them has hung or died; stopping the job "
                           "(LOWRANK_COMM_TIMEOUT sets the limit)")

    def allreduce_sum(self, buf):
        if isinstance(buf, np.ndarray):
            if not buf.flags.c_contiguous:
                raise ValueError("allreduce_sum needs a contiguous buffer")
            with self._collective("allreduce"):
                self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
            return buf
        host = _host_copy(buf)           # a device array: through the host
        self.allreduce_sum(host)
        _write_back(buf, host)
        return buf

    def broadcast(self, obj, root: int = 0):
        with self._collective("broadcast"):
            if isinstance(obj, np.ndarray) and obj.flags.c_contiguous:
                self.comm.Bcast(obj, root=root)
                return obj
            return self.comm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        with self._collective("allgather"):
            return self.comm.allgather(obj)

    def barrier(self) -> None:
        with self._collective("barrier"):
            self.comm.Barrier()

    def _allreduce_max_int(self, ints):
        out = np.empty_like(ints)
        with self._collective("checksum comparison"):
            self.comm.Allreduce(ints, out, op=self.MPI.MAX)
        return out

    def abort(self, message: str, code: int = 1):
        print(f"{message} [rank {self.rank} of {self.size}]", file=sys.stderr, flush=True)
        if self.size == 1:
            raise SystemExit(code)
        time.sleep(0.5)   # let mpiexec forward the message before MPI_Abort tears the job down
        self.comm.Abort(code)

    def node_ranks(self) -> tuple[int, int]:
        """``(index of this process among the ranks on its node, ranks on the node)``."""
        shared = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return shared.Get_rank(), shared.Get_size()
        finally:
            shared.Free()


def _abort_on_uncaught_exception(comm) -> None:
    """An uncaught exception on one rank stops every rank (else the others would wait in
    their next collective forever): print the traceback, then ``MPI_Abort``."""
    previous = sys.excepthook
    if getattr(previous, "_lowrank_abort", False):
        return

    def hook(kind, value, tb):
        previous(kind, value, tb)
        comm.abort(f"lowrank: uncaught {kind.__name__}: {value}; stopping every rank")
    hook._lowrank_abort = True
    sys.excepthook = hook


# --- NCCL (CuPy) ---------------------------------------------------------------------------

class NCCLComm(Comm):
    """NCCL all-reduce of device buffers on CuPy's current stream; ``host`` (an MPI
    communicator) bootstraps it (the unique id is broadcast) and does all host work.

    ``nccl`` and ``xp`` can be injected, so the logic (pointer, count, dtype, op, stream) is
    tested on the CPU with a fake NCCL over NumPy memory."""

    kind = "nccl"

    def __init__(self, host: Comm | None = None, *, nccl=None, xp=None):
        self.host = MPIComm() if host is None else host
        self.rank, self.size = self.host.rank, self.host.size
        self.xp = backend.namespace("cupy") if xp is None else xp
        if nccl is None:
            try:
                nccl = self.xp.cuda.nccl
                nccl.get_version()
            except Exception as exc:  # ImportError / AttributeError / CUDARuntimeError
                raise RuntimeError("NCCL is not usable from CuPy here "
                                   f"({type(exc).__name__}: {exc}); install it (e.g. `python -m "
                                   "cupyx.tools.install_library --library nccl --cuda 12.x`) "
                                   "or use --comm mpi") from exc
        self.nccl = nccl
        self.dtypes = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}
        if hasattr(self.xp, "cuda"):
            local, per_node = _node_ranks(self.host)
            devices = _device_count(self.xp)
            if devices < per_node:
                raise ValueError(f"NCCL needs one GPU per process: {per_node} processes share "
                                 f"{devices} GPU(s) on this node; use --comm mpi")
            self.xp.cuda.Device(local).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.host.broadcast(uid, 0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _on_device(self, buf) -> bool:
        try:
            return backend.get_namespace(buf) is self.xp
        except ValueError:
            return False

    def _stream(self) -> int:
        return self.xp.cuda.get_current_stream().ptr if hasattr(self.xp, "cuda") else 0

    def allreduce_sum(self, buf):
        if not self._on_device(buf):
            return self.host.allreduce_sum(buf)
        dtype = self.dtypes.get(np.dtype(buf.dtype).name)
        if dtype is None:
            raise ValueError(f"NCCL all-reduce supports {sorted(self.dtypes)}, got {buf.dtype}")
        if not buf.flags.c_contiguous:
            raise ValueError("allreduce_sum needs a contiguous buffer")
        ptr = _pointer(buf)
        self.comm.allReduce(ptr, ptr, int(buf.size), dtype, self.nccl.NCCL_SUM, self._stream())
        return buf

    def broadcast(self, obj, root: int = 0):
        if self._on_device(obj):
            host = self.host.broadcast(_host_copy(obj), root)
            _write_back(obj, host)
            return obj
        return self.host.broadcast(obj, root)

    def allgather(self, obj) -> list:
        return self.host.allgather(obj)

    def barrier(self) -> None:
        self.host.barrier()

    def _allreduce_max_int(self, ints):
        return self.host._allreduce_max_int(ints)

    def abort(self, message: str, code: int = 1):
        return self.host.abort(message, code)


def _pointer(buf) -> int:
    """Device address of a CuPy array (``buf.data.ptr``); host address for NumPy (fakes)."""
    ptr = getattr(getattr(buf, "data", None), "ptr", None)
    return int(ptr) if ptr is not None else int(buf.ctypes.data)


def _node_ranks(host: Comm) -> tuple[int, int]:
    if hasattr(host, "node_ranks"):
        return host.node_ranks()
    return host.rank, host.size


def _device_count(xp) -> int:
    return int(xp.cuda.runtime.getDeviceCount())


# --- choosing ------------------------------------------------------------------------------

def launched_size() -> int:
    """The world size an MPI launcher (mpiexec/mpirun) gave this process; 1 when none."""
    for var in _SIZE_VARS:
        value = os.environ.get(var)
        if value and value.strip().isdigit():
            return int(value)
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_size()
    return 1


def get_comm(kind: str = "auto", backend_name: str | None = None) -> Comm:
    """``auto``: under an MPI launcher with more than one process, NCCL when the backend is
    ``cupy`` (and each process on a node has its own GPU), else MPI; otherwise a single
    process. ``none``: single process. ``mpi`` / ``nccl``: that one (errors if unusable)."""
    if kind not in COMM_KINDS:
        raise ValueError(f"comm must be one of {COMM_KINDS}, got {kind!r}")
    if kind == "none":
        return SingleProcess()
    name = backend_name or backend.get_backend()
    if kind == "auto":
        if launched_size() <= 1:
            return SingleProcess()
        kind = "nccl" if name == "cupy" else "mpi"
        if kind == "nccl":
            host = MPIComm()
            per_node = host.node_ranks()[1]
            if _device_count(backend.namespace("cupy")) < per_node:
                print(f"lowrank: {per_node} processes share fewer GPUs on this node; NCCL needs "
                      "one GPU per process, so gradients go through MPI on the host",
                      file=sys.stderr)
                return host
            return NCCLComm(host)
    if kind == "mpi":
        return MPIComm()
    if name != "cupy":
        raise ValueError(f"--comm nccl needs the cupy backend, not {name!r}")
    return NCCLComm(MPIComm())


__all__ = ["COMM_KINDS", "Comm", "SingleProcess", "MPIComm", "NCCLComm", "get_comm",
           "launched_size"]
