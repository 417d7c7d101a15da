"""The array backend: the only place that imports numpy, cupy or cupyx for compute.

Three backends share one code path:

* ``numpy``        — the CPU reference;
* ``cupy``         — the GPU (extra ``gpu``);
* ``numpy-strict`` — NumPy arrays that raise wherever CuPy would (see ``strict.py``), so
  the GPU switch is proven on machines without a GPU.

Compute code never names a backend: it asks ``get_namespace(*arrays)`` for ``xp``.
Host<->device moves are explicit (``asarray``, ``to_numpy``). Random initial values are drawn
on the host in float64 with PCG64, cast, then moved, so every backend starts bit-identical.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .blocked import map_rows, phi_float32
from .dropout_mask import DropoutMask
from .strict import StrictArray, StrictMixingError, strict_numpy

BACKENDS = ("numpy", "numpy-strict", "cupy")
FLOAT_DTYPES = ("float32", "float64")
DEFAULT_DTYPE = "float32"

_active = None  # the selected backend's name; resolved lazily from LOWRANK_BACKEND


# --- selection -------------------------------------------------------------------------

def _import_cupy():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, CUDARuntimeError, ...
        raise RuntimeError(
            "backend 'cupy' is not usable here: "
            f"{type(exc).__name__}: {exc}. Install the GPU extra with "
            "`pip install -e \".[gpu]\"` (a cupy-cudaXXx wheel matching your CUDA) on a machine "
            "with an NVIDIA GPU, or use backend 'numpy'.") from exc
    return cupy


def cupy_available() -> bool:
    try:
        _import_cupy()
    except RuntimeError:
        return False
    return True


def namespace(name: str):
    """The array module of backend ``name``."""
    if name == "numpy":
        return np
    if name == "numpy-strict":
        return strict_numpy
    if name == "cupy":
        return _import_cupy()
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def set_backend(name: str) -> None:
    """Select the backend used where no input array decides it (parameter creation)."""
    global _active
    namespace(name)  # validates and, for cupy, checks that it loads
    _active = name


def get_backend() -> str:
    if _active is None:
        set_backend(os.environ.get("LOWRANK_BACKEND", "numpy"))
    return _active


def xp_default():
    return namespace(get_backend())


def backend_of(array) -> str:
    if isinstance(array, StrictArray):
        return "numpy-strict"
    if isinstance(array, (np.ndarray, np.generic)):
        return "numpy"
    if type(array).__module__.startswith("cupy"):
        return "cupy"
    raise ValueError(f"not an array of a known backend: {type(array).__name__}")


def get_namespace(*arrays):
    """``xp`` for the given arrays (``None`` entries ignored); mixing backends raises."""
    names = {backend_of(a) for a in arrays if a is not None}
    if len(names) > 1:
        raise ValueError(f"arrays from different backends were mixed: {sorted(names)}; "
                         "move them explicitly with lowrank.backend.asarray()")
    return namespace(names.pop()) if names else xp_default()


# --- moves and dtypes ------------------------------------------------------------------

def asarray(a, dtype=None, xp=None):
    """Explicit move/cast of host data (or an array) onto backend ``xp`` (default: active)."""
    xp = xp_default() if xp is None else xp
    return xp.asarray(a, dtype=dtype)


def to_numpy(a) -> np.ndarray:
    """Explicit copy of any backend array to a host ``numpy.ndarray``."""
    if isinstance(a, np.ndarray):
        return a
    if isinstance(a, StrictArray) or backend_of(a) == "cupy":
        return a.get()
    return np.asarray(a)


def synchronize(xp=None) -> None:
    """Wait for queued device work (a no-op on the CPU backends); use before timing."""
    xp = xp_default() if xp is None else xp
    if getattr(xp, "__name__", "") == "cupy":
        xp.cuda.get_current_stream().synchronize()


def check_dtype(dtype) -> str:
    """Normalise a float dtype name; only float32 and float64 are supported."""
    name = np.dtype(dtype).name if dtype is not None else DEFAULT_DTYPE
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {name!r}")
    return name


def tolerance(dtype) -> float:
    """Relative tolerance for comparing results computed in ``dtype`` against float64."""
    return {"float32": 1e-5, "float64": 1e-12}[check_dtype(dtype)]


# --- randomness --------------------------------------------------------------------------

def host_rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.Generator(np.random.PCG64(seed))


def host_normal(rng, shape, std=1.0, dtype=DEFAULT_DTYPE, xp=None):
    """N(0, std²) drawn on the host in float64, cast to ``dtype``, moved to ``xp``."""
    values = host_rng(rng).standard_normal(shape) * std
    return asarray(values.astype(check_dtype(dtype)), xp=xp)


def host_uniform(rng, shape, low, high, dtype=DEFAULT_DTYPE, xp=None):
    values = host_rng(rng).uniform(low, high, size=shape)
    return asarray(values.astype(check_dtype(dtype)), xp=xp)


def host_torch_uniform(seed: int, shapes_and_bounds, dtype=DEFAULT_DTYPE, xp=None) -> list:
    """Arrays ``U(-bound, bound)`` of the given shapes drawn one after another from one
    MT19937 stream seeded with ``seed``, bit-identical to ``torch.Generator().manual_seed(seed)``
    and ``tensor.uniform_(-bound, bound, generator=...)`` on a float32 CPU tensor (24 random
    bits per value, one fused multiply-add in float32): how PEFT draws VeRA's shared
    projections (docs/variants.md#vera). Cast to ``dtype``, moved to ``xp``."""
    stream = np.random.RandomState(int(seed))   # init_genrand(seed), as torch's mt19937
    out = []
    for shape, bound in shapes_and_bounds:
        count = int(np.prod(shape))
        raw = stream.randint(0, 2**32, size=count, dtype=np.uint32)      # MT19937's raw words
        unit = (raw & np.uint32((1 << 24) - 1)).astype(np.float64) * 2.0**-24
        low, high = np.float32(-bound), np.float32(bound)
        span = np.float64(np.float32(high - low))
        values = (unit * span + np.float64(low)).astype(np.float32).reshape(shape)
        out.append(asarray(values.astype(check_dtype(dtype)), xp=xp))
    return out


class DeviceRNG:
    """Per-step randomness (dropout masks) drawn where the arrays live, no host transfer."""

    def __init__(self, seed: int, xp):
        self.xp = xp
        if getattr(xp, "__name__", "") == "cupy":
            self._gen = xp.random.default_rng(seed)
        else:
            self._gen = np.random.Generator(np.random.PCG64(seed))

    @property
    def state(self):
        """The generator state (JSON-able) for bit-identical resume; ``None`` on CuPy."""
        if getattr(self.xp, "__name__", "") == "cupy":
            return None
        return self._gen.bit_generator.state

    @state.setter
    def state(self, value) -> None:
        if value is not None and getattr(self.xp, "__name__", "") != "cupy":
            self._gen.bit_generator.state = value

    def spawn(self) -> "DeviceRNG":
        """A new, independent stream seeded from this one (which advances by one draw)."""
        return DeviceRNG(int(self._gen.integers(2**62)), self.xp)

    def keep_mask(self, shape, p: float, dtype):
        """Inverted-dropout multiplier: 1/(1-p) where kept, 0 where dropped."""
        if getattr(self.xp, "__name__", "") == "cupy":
            keep = self._gen.random(shape) >= p
            return keep.astype(dtype) * (1.0 / (1.0 - p))
        bits, threshold = self._keep_bits(shape, p)
        mask = np.multiply(bits >= threshold, 1.0 / (1.0 - p), dtype=dtype)   # one pass
        if self.xp is strict_numpy:
            mask = strict_numpy.asarray(mask)
        return mask

    def _keep_bits(self, shape, p: float):
        # 32 random bits per element (two per PCG64 draw) against a 32-bit threshold: keep
        # with probability 1 - round(p·2³²)/2³², half the bits and passes of a float64
        # uniform each (a mask of every adapted input, every step: it showed in profiles)
        n = math.prod(shape)
        bits = self._gen.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
        return bits.reshape(shape), np.uint32(min(round(p * 2**32), 2**32 - 1))

    def dropout(self, x, p: float):
        """``(x ⊙ mask, mask)`` with ``mask = keep_mask(x.shape, p, x.dtype)``: the same
        bits, on NumPy made and applied block by block over rows (blocked.map_rows)."""
        if type(x) is not np.ndarray or x.ndim < 1:
            mask = self.keep_mask(x.shape, p, x.dtype)
            return x * mask, mask
        bits, threshold = self._keep_bits(x.shape, p)
        k = x.shape[-1]
        x_d, mask = map_rows(_dropout_chain, x.reshape(-1, k), bits.reshape(-1, k), threshold,
                             1.0 / (1.0 - p), outputs=2)                # (N, k) rows
        return x_d.reshape(x.shape), mask.reshape(x.shape)

    def compact_dropout(self, x, p: float):
        """``(x ⊙ mask, DropoutMask)``: the bits ``dropout`` draws, the mask kept as one byte
        per element on NumPy (an adapter's backward forms ``x ⊙ mask`` again from it)."""
        if type(x) is not np.ndarray or x.ndim < 1:
            mask = self.keep_mask(x.shape, p, x.dtype)
            return x * mask, DropoutMask(dense=mask)
        bits, threshold = self._keep_bits(x.shape, p)
        mask = DropoutMask(keep=bits >= threshold, scale=1.0 / (1.0 - p))
        return mask.apply(x), mask


def _dropout_chain(x, bits, threshold, scale, out=None):
    x_d, mask = (None, None) if out is None else out
    mask = np.empty_like(x) if mask is None else mask
    np.greater_equal(bits, threshold, out=mask)   # 1.0 kept, 0.0 dropped
    mask *= x.dtype.type(scale)         # the bits of keep_mask's one-pass product
    return np.multiply(x, mask, out=x_d), mask


# --- linear algebra and scatter --------------------------------------------------------

def svd(a):
    """Thin SVD ``U (m,k), S (k,), Vt (k,n)``, k = min(m, n)."""
    xp = get_namespace(a)
    return xp.linalg.svd(a, full_matrices=False)


def qr(a):
    """Reduced QR ``Q (m,k), R (k,n)``."""
    xp = get_namespace(a)
    return xp.linalg.qr(a, mode="reduced")


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with repeated indices accumulated (embedding backward)."""
    name = backend_of(target)
    get_namespace(target, indices, values)
    if name == "numpy":
        np.add.at(target, indices, values)
    elif name == "numpy-strict":
        np.add.at(target._a, indices._a if isinstance(indices, StrictArray) else indices,
                  values._a)
    else:
        import cupyx
        cupyx.scatter_add(target, indices, values)


def erf(x, out=None):
    """The error function, elementwise, on ``x``'s backend (exact erf GELU needs it; neither
    numpy nor cupy has it in the main namespace); ``out`` may be ``x`` itself."""
    name = backend_of(x)
    if name == "numpy":
        from scipy.special import erf as _erf
        return _erf(x, out=out)
    if name == "numpy-strict":
        from scipy.special import erf as _erf
        if out is None:
            return StrictArray(_erf(x._a))
        _erf(x._a, out=out._a)
        return out
    from cupyx.scipy.special import erf as _erf
    return _erf(x) if out is None else _erf(x, out=out)


def normal_cdf(x):
    """``Φ(x) = ½ (1 + erf(x / √2))`` elementwise, a new array. Float32 NumPy arrays take the
    rational form of ``blocked.phi_float32`` (docs/performance.md#erf-gelu); float64 (the
    gradient checks), CuPy and numpy-strict the exact erf."""
    if type(x) is np.ndarray and x.dtype == np.float32:
        return phi_float32(x)
    phi = get_namespace(x).multiply(x, 1.0 / math.sqrt(2.0))
    phi = erf(phi, out=phi)
    phi += 1.0
    phi *= 0.5
    return phi


def _glibc_mallopt():
    """glibc's ``mallopt`` through ctypes, or None (not Linux, not glibc)."""
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):   # not glibc (e.g. musl)
        return None


def keep_freed_host_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let glibc keep freed blocks up to ``limit_bytes`` instead of returning them to the OS.

    A training step allocates and frees the same large activation arrays every step; by
    default glibc serves blocks over its mmap threshold with fresh pages (a page fault per
    4 KiB, zero-filled) and trims freed heap, which measured 20–30% of a CPU step here. This
    is the host-side analogue of PyTorch's caching allocator. Process-wide, so the CLI and
    benchmarks call it, not the library at import. Returns False where it does not apply.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    limit = int(min(limit_bytes, 2**31 - 1))
    return bool(mallopt(M_MMAP_THRESHOLD, min(limit, 32 << 20))) and \
        bool(mallopt(M_TRIM_THRESHOLD, limit))


def one_malloc_arena() -> bool:
    """Threads started from now on allocate from the main heap, whose freed blocks
    ``keep_freed_host_memory`` keeps. A thread's own glibc arena hands its heaps back to the
    OS as they empty: batch shards' worker threads faulted 2,600–3,900 pages a step, 7–11 ms
    of system time (docs/performance.md#batch-shards). ``parallel.BatchShards`` calls this
    before its workers start; not at import, because many allocating threads (the tokenizer's)
    would then share one lock. Returns False where it does not apply."""
    mallopt = _glibc_mallopt()
    return mallopt is not None and bool(mallopt(-8, 1))   # M_ARENA_MAX


def is_finite(a) -> bool:
    xp = get_namespace(a)
    return bool(xp.all(xp.isfinite(a)))


__all__ = [
    "BACKENDS", "FLOAT_DTYPES", "DEFAULT_DTYPE", "StrictArray", "StrictMixingError",
    "namespace", "set_backend", "get_backend", "xp_default", "backend_of", "get_namespace",
    "asarray", "to_numpy", "synchronize", "check_dtype", "tolerance", "host_rng",
    "host_normal", "host_uniform", "DeviceRNG", "svd", "qr", "scatter_add", "is_finite",
    "keep_freed_host_memory", "one_malloc_arena", "erf", "normal_cdf",
    "cupy_available",
]
