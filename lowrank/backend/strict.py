"""numpy-strict: NumPy arrays that fail wherever the same code would fail on CuPy.

A `StrictArray` wraps an ``ndarray`` and refuses

* any operation that mixes it with a plain ``numpy.ndarray`` (CuPy raises TypeError),
* implicit conversion to a host array (``np.asarray(a)``; CuPy raises TypeError),
* plain ``ndarray`` indices or assigned values (on CuPy a silent host->device copy).

Reductions return 0-d arrays instead of NumPy scalars, as CuPy does, so dtype promotion
matches the GPU. Python scalars, ``float(a)``, ``a.item()`` and ``a.tolist()`` work, as on CuPy.
The namespace ``strict_numpy`` plays the role of the ``cupy`` module.
"""
from __future__ import annotations

import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


class StrictMixingError(TypeError):
    """Raised where NumPy would quietly accept what CuPy rejects."""


def _unwrap(value):
    """StrictArray -> its ndarray; plain ndarray -> error; containers recursively."""
    if isinstance(value, StrictArray):
        return value._a
    if isinstance(value, np.ndarray):
        raise StrictMixingError(
            "numpy-strict: a plain numpy.ndarray was mixed with a device array "
            f"(shape {value.shape}); move it explicitly with backend.asarray()")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _wrap(value):
    """ndarray / NumPy scalar -> StrictArray; containers recursively."""
    if isinstance(value, np.ndarray):
        return StrictArray(value)
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        return StrictArray(np.asarray(value))
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple (SVDResult, QRResult)
        return type(value)(*(_wrap(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_wrap(v) for v in value)
    return value


class StrictArray(NDArrayOperatorsMixin):
    __slots__ = ("_a",)
    __array_priority__ = 1000

    def __init__(self, a: np.ndarray):
        self._a = a

    # --- the CuPy-like refusals -------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise StrictMixingError(
            "numpy-strict: implicit conversion to a NumPy array is not allowed "
            "(CuPy refuses it too); use backend.to_numpy()")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"])
        result = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    # --- ndarray surface ---------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: StrictArray(self._a.T))
    real = property(lambda self: StrictArray(self._a.real))

    def __getattr__(self, name):
        if name.startswith("__"):  # never leak __array_interface__ & co: that is a host view
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return method

    def __getitem__(self, index):
        return _wrap(self._a[_unwrap(index)])

    def __setitem__(self, index, value):
        self._a[_unwrap(index)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return "strict_" + repr(self._a)

    def __copy__(self):
        return StrictArray(self._a.copy())

    def __deepcopy__(self, memo):
        return StrictArray(self._a.copy())

    def get(self):
        """Explicit device->host copy, as ``cupy.ndarray.get()``."""
        return self._a.copy()


def _strict_function(func):
    def call(*args, **kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))
    call.__name__ = getattr(func, "__name__", "function")
    call.__doc__ = getattr(func, "__doc__", None)
    return call


class _StrictNamespace(types.SimpleNamespace):
    """A module-like view of ``numpy`` (or a submodule) whose functions take and give StrictArrays."""

    def __init__(self, module, name):
        super().__init__()
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "__name__", name)

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if isinstance(attr, types.ModuleType):
            return _StrictNamespace(attr, f"{self.__name__}.{name}")
        if isinstance(attr, type) or not callable(attr):  # dtypes, constants, classes
            return attr
        return _strict_function(attr)

    def asarray(self, a, dtype=None):
        """The one explicit host->device move (``cupy.asarray``)."""
        if isinstance(a, StrictArray):
            return a if dtype is None or a.dtype == dtype else StrictArray(a._a.astype(dtype))
        return StrictArray(np.array(a, dtype=dtype, copy=True))

    array = asarray

    def __repr__(self):
        return f"<numpy-strict namespace {self.__name__}>"


strict_numpy = _StrictNamespace(np, "strict_numpy")
