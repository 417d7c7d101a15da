"""Token / position embedding lookup: ``out = W[idx]``, ``W (V, d)``, ``idx`` integer ``(B, T)``.

Backward is a scatter-add: a token that appears several times in the batch receives the sum
of its rows of ``dout``. NumPy needs ``np.add.at`` and CuPy ``cupyx.scatter_add`` for that
(plain ``dW[idx] += dout`` would keep only one of the repeated rows), so it goes through
``backend.scatter_add``.
"""
from __future__ import annotations

from .. import backend


def embedding_forward(weight, idx):
    """Returns ``(out (*idx.shape, d), idx)``: the indices are all the weight gradient needs."""
    xp = backend.get_namespace(weight, idx)
    out = xp.take(weight, idx, axis=0)                  # (B, T, d)
    return out, idx


def embedding_backward(dout, idx, num_embeddings: int):
    """``dW (V, d)``; only called when the embedding is trainable (dW is a dense (V, d) array)."""
    xp = backend.get_namespace(dout, idx)
    d = dout.shape[-1]
    dweight = xp.zeros((num_embeddings, d), dtype=dout.dtype)     # (V, d)
    backend.scatter_add(dweight, idx.reshape(-1), dout.reshape(-1, d))   # rows (B*T, d)
    return dweight
