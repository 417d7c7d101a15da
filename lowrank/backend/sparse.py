"""Sparse matrices on every backend: CSR with a fixed support (RoSA's S, docs/variants.md#rosa).

The backend is the only place that imports scipy/cupyx (docs/backends.md#xp-rule), so the few sparse
primitives an adapter needs live here:

* ``CSRPattern(rows, cols, shape)`` — a fixed support (sorted row-major, unique) kept as
  ``indices``/``indptr`` (int32, as cuSPARSE wants) plus ``rows`` for gradient gathers;
  ``pattern.matrix(values)`` gives the backend's CSR matrix *sharing* ``values`` (no copy,
  so an optimizer updating ``values`` in place updates the matrix too);
* ``csr_matrix(rows, cols, values, shape)`` — the same in one call;
* ``matmul(S, X)`` = ``S @ X`` and ``matmul(S, X, transpose=True)`` = ``Sᵀ @ X``, X dense;
* ``support_grad(G, X, rows, cols)`` — ``out[k] = Σ_rows G[:, rows[k]] X[:, cols[k]]``,
  i.e. ``(Gᵀ X)`` on the support only: O(nnz·N) work, O(block·N) scratch, never (m, n);
* ``to_dense(S)``, ``nbytes(S)`` (data + indices + indptr), ``top_k_flat(score, k)``.

Matrices are ``scipy.sparse.csr_matrix`` on NumPy, ``cupyx.scipy.sparse.csr_matrix`` on
CuPy, and ``StrictCSR`` under numpy-strict: a scipy matrix over the unwrapped arrays that,
like every strict array, refuses plain ``numpy.ndarray`` operands and returns StrictArrays.
scipy/cupyx are imported lazily: ``import lowrank`` should not pay for them.
"""
from __future__ import annotations

import numpy as np

from . import StrictArray, backend_of, get_namespace
from .strict import _unwrap, _wrap

# rows of the support handled at once by support_grad: bounds its scratch to ~block·N
_BLOCK_ELEMENTS = 1 << 22


def _scipy_sparse():
    import scipy.sparse
    return scipy.sparse


def _cupyx_sparse():
    import cupyx.scipy.sparse
    return cupyx.scipy.sparse


class StrictCSR:
    """numpy-strict's CSR matrix: a scipy matrix whose operands must be StrictArrays."""

    __slots__ = ("_m",)

    def __init__(self, matrix):
        self._m = matrix

    shape = property(lambda self: self._m.shape)
    dtype = property(lambda self: self._m.dtype)
    nnz = property(lambda self: self._m.nnz)
    data = property(lambda self: StrictArray(self._m.data))
    indices = property(lambda self: StrictArray(self._m.indices))
    indptr = property(lambda self: StrictArray(self._m.indptr))

    def __repr__(self):
        return f"StrictCSR(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype})"


def is_sparse(S) -> bool:
    if isinstance(S, StrictCSR):
        return True
    module = type(S).__module__
    return module.startswith("scipy.sparse") or module.startswith("cupyx.scipy.sparse")


def _backend_of_sparse(S) -> str:
    if isinstance(S, StrictCSR):
        return "numpy-strict"
    return "cupy" if type(S).__module__.startswith("cupyx") else "numpy"


def _check_sparse(S) -> None:
    if not is_sparse(S):
        raise ValueError(f"expected a sparse matrix from lowrank.backend.sparse, "
                         f"got {type(S).__name__}")


class CSRPattern:
    """The fixed support of an (m, n) CSR matrix, on the backend of ``rows``/``cols``.

    ``rows``, ``cols``: 1-D integer arrays of equal length, sorted row-major (by row, then
    column) without repeats — the order in which CSR stores its values, so a values array
    in that order is the matrix's ``data`` as it is. Memory: 4·(2·nnz + m + 1) bytes.
    """

    def __init__(self, rows, cols, shape):
        xp = get_namespace(rows, cols)
        m, n = (int(shape[0]), int(shape[1]))
        if getattr(rows, "ndim", None) != 1 or getattr(cols, "ndim", None) != 1 \
                or rows.shape != cols.shape:
            raise ValueError(f"rows and cols must be 1-D arrays of equal length, got shapes "
                             f"{getattr(rows, 'shape', None)} and {getattr(cols, 'shape', None)}")
        if m < 1 or n < 1 or m * n >= 2**31:
            raise ValueError(f"shape must be positive with m·n < 2**31 (int32 CSR), got {shape}")
        flat = rows.astype("int64") * n + cols.astype("int64")          # (nnz,)
        if rows.size and not (bool(xp.all(rows >= 0)) and bool(xp.all(rows < m))
                              and bool(xp.all(cols >= 0)) and bool(xp.all(cols < n))):
            raise ValueError(f"support indices lie outside the {m}x{n} matrix")
        if rows.size > 1 and not bool(xp.all(flat[1:] > flat[:-1])):
            raise ValueError("support must be sorted row-major without repeats (CSR order)")
        self.xp, self.shape, self.nnz = xp, (m, n), int(rows.size)
        self.rows = rows.astype("int32")                                 # (nnz,)
        self.indices = cols.astype("int32")                              # (nnz,) columns
        counts = xp.bincount(self.rows, minlength=m) if self.nnz else xp.zeros(m, dtype="int64")
        indptr = xp.zeros(m + 1, dtype="int32")                          # (m+1,)
        indptr[1:] = xp.cumsum(counts).astype("int32")
        self.indptr = indptr

    @classmethod
    def from_flat(cls, flat, shape):
        """From row-major flat indices ``i·n + j`` (sorted, unique)."""
        n = int(shape[1])
        flat = flat.astype("int64")
        return cls(flat // n, flat % n, shape)

    def flat(self):
        """Row-major flat indices ``i·n + j`` (int64) of the support."""
        return self.rows.astype("int64") * self.shape[1] + self.indices.astype("int64")

    def matrix(self, values):
        """The backend's CSR matrix with this support and ``values`` (shared, not copied)."""
        get_namespace(values, self.rows)   # mixing backends raises
        if getattr(values, "ndim", None) != 1 or values.shape[0] != self.nnz:
            raise ValueError(f"values must have shape ({self.nnz},), got "
                             f"{getattr(values, 'shape', None)}")
        name = backend_of(values)
        if name == "cupy":
            return _cupyx_sparse().csr_matrix((values, self.indices, self.indptr),
                                              shape=self.shape, copy=False)
        parts = (values, self.indices, self.indptr)
        if name == "numpy-strict":
            parts = _unwrap(parts)
        matrix = _scipy_sparse().csr_matrix(parts, shape=self.shape, copy=False)
        return StrictCSR(matrix) if name == "numpy-strict" else matrix

    def nbytes(self, itemsize: int) -> dict:
        """Bytes of the CSR matrix with values of ``itemsize`` bytes: data, indices, indptr."""
        data = self.nnz * int(itemsize)
        indices = int(self.indices.nbytes)
        indptr = int(self.indptr.nbytes)
        return {"data": data, "indices": indices, "indptr": indptr,
                "total": data + indices + indptr}


def csr_matrix(rows, cols, values, shape):
    """CSR matrix from (rows, cols, values) on their backend; the support must be sorted
    row-major without repeats (``values`` is shared, so its order is the storage order)."""
    get_namespace(rows, cols, values)
    return CSRPattern(rows, cols, shape).matrix(values)


def matmul(S, X, transpose: bool = False):
    """``S @ X`` (or ``Sᵀ @ X`` with ``transpose``) for a dense 2-D ``X``, on S's backend."""
    _check_sparse(S)
    if getattr(X, "ndim", None) != 2:
        raise ValueError(f"X must be a 2-D dense array, got shape {getattr(X, 'shape', None)}")
    k = S.shape[0] if transpose else S.shape[1]
    if X.shape[0] != k:
        raise ValueError(f"shape mismatch: {'Sᵀ' if transpose else 'S'} of shape "
                         f"{S.shape[::-1] if transpose else S.shape} times X of shape {X.shape}")
    if isinstance(S, StrictCSR) and not isinstance(X, StrictArray):
        _unwrap(X)   # a plain ndarray raises StrictMixingError, as CuPy would
    if backend_of(X) != _backend_of_sparse(S):
        raise ValueError(f"arrays from different backends were mixed: a "
                         f"{_backend_of_sparse(S)} sparse matrix and a {backend_of(X)} array")
    if isinstance(S, StrictCSR):
        A = S._m.T if transpose else S._m
        return _wrap(np.asarray(A @ X._a))
    A = S.T if transpose else S
    return A @ X                          # scipy/cupyx: sparse @ dense -> dense array


def to_dense(S):
    """The dense (m, n) array of ``S`` on its backend."""
    _check_sparse(S)
    if isinstance(S, StrictCSR):
        return StrictArray(S._m.toarray())
    return S.toarray()


def nbytes(S) -> int:
    """Bytes held by the CSR matrix: data + indices + indptr (what O(nnz) memory means)."""
    _check_sparse(S)
    return int(S.data.nbytes) + int(S.indices.nbytes) + int(S.indptr.nbytes)


def support_grad(G, X, rows, cols):
    """``out[k] = Σ_rows G[:, rows[k]] · X[:, cols[k]]`` (nnz,): ``Gᵀ X`` on the support only.

    ``G (N, m)``, ``X (N, n)``. Work O(nnz·N); the support is handled in blocks so the
    scratch stays about ``_BLOCK_ELEMENTS`` values however large nnz·N gets.
    """
    xp = get_namespace(G, X, rows, cols)
    nnz, N = int(rows.shape[0]), int(G.shape[0])
    out = xp.empty((nnz,), dtype=G.dtype)                               # (nnz,)
    block = max(1, _BLOCK_ELEMENTS // max(N, 1))
    for start in range(0, nnz, block):
        stop = min(nnz, start + block)
        g = xp.take(G, rows[start:stop], axis=1)                        # (N, b) column gather
        x = xp.take(X, cols[start:stop], axis=1)                        # (N, b)
        out[start:stop] = xp.einsum("ij,ij->j", g, x)                   # (b,) column dots
    return out


def top_k_flat(score, k: int):
    """Sorted row-major flat indices (int64) of the ``k`` largest entries of ``score``;
    ties go to the lower flat index (a stable sort), so the choice is deterministic."""
    xp = get_namespace(score)
    flat = score.reshape(-1)
    if not 1 <= int(k) <= flat.shape[0]:
        raise ValueError(f"k must be in 1..{flat.shape[0]}, got {k!r}")
    neg = -flat
    order = xp.argsort(neg) if backend_of(score) == "cupy" else xp.argsort(neg, kind="stable")
    return xp.sort(order[:int(k)]).astype("int64")


__all__ = ["CSRPattern", "StrictCSR", "csr_matrix", "matmul", "to_dense", "nbytes",
           "support_grad", "top_k_flat", "is_sparse"]
