"""The loss of a causal language model on labelled positions only (docs/chat.md#loss).

Instruction tuning scores the assistant's tokens alone; every other position carries the
target ``IGNORE`` (-100, as transformers). With a vocabulary of tens of thousands of words the
head's product ``hidden W_headᵀ`` is a large part of a step, so it runs only on the rows
that carry a label:

    hidden = trunk(ids)                       (B, T, d)   no head
    rows   = { n : targets[n] >= 0 }          n over the B·T flattened positions
    loss   = mean_{n in rows} CE(hidden[n] W_headᵀ, targets[n])

and the backward scatters ``dhidden`` of those rows into a zero ``(B, T, d)`` before the
trunk's backward. The model provides ``forward(ids, mask, logits=False)``, ``head_forward``,
``head_backward`` and ``backward`` (the Llama family does).
"""
from __future__ import annotations

from ..ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
from .blocks import any_trainable

IGNORE = -100


def labelled_rows(model, ids, targets):
    """``(targets flattened (B·T,), the indices n of the labelled ones (n,))``."""
    if tuple(targets.shape) != tuple(ids.shape):
        raise ValueError(f"targets must have shape {tuple(ids.shape)}, got {tuple(targets.shape)}")
    flat = targets.reshape(-1)                                   # (B·T,)
    rows = model.xp.nonzero(flat >= 0)[0]                        # (n,)
    if int(rows.size) == 0:
        raise ValueError("no position carries a label (every target is ignored)")
    return flat, rows


def labelled_loss_value(model, ids, targets, attention_mask=None) -> float:
    """The same mean as ``labelled_loss_forward`` for scoring: no cache is kept, so its
    memory is one layer's activations, not the whole trunk's."""
    flat, rows = labelled_rows(model, ids, targets)
    hidden, _ = model.forward(ids, attention_mask, logits=False, keep_cache=False)
    logits, _ = model.head_forward(hidden.reshape(-1, hidden.shape[-1])[rows])   # (n, V)
    return cross_entropy_forward(logits[None], flat[rows][None])[0]


def labelled_loss_forward(model, ids, targets, attention_mask=None):
    """``(mean cross-entropy over the positions whose target is >= 0, cache)``."""
    flat, rows = labelled_rows(model, ids, targets)
    hidden, cache = model.forward(ids, attention_mask, logits=False)   # (B, T, d)
    shape = hidden.shape
    picked = hidden.reshape(-1, shape[-1])[rows]                 # (n, d)
    logits, c_head = model.head_forward(picked)                  # (n, V)
    loss, c_ce = cross_entropy_forward(logits[None], flat[rows][None])   # over (1, n, V)
    return loss, (cache, c_head, c_ce, rows, shape)


def labelled_loss_backward(model, cache, dloss: float = 1.0) -> None:
    """Accumulate the gradients of ``dloss × loss`` into every trainable parameter."""
    model_cache, c_head, c_ce, rows, shape = cache
    dlogits = cross_entropy_backward(c_ce, dloss)[0]             # (n, V)
    trunk = any_trainable(model.model)
    dpicked = model.head_backward(dlogits, c_head, need_dx=trunk)   # (n, d)
    if not trunk:
        return
    xp = model.xp
    dhidden = xp.zeros((shape[0] * shape[1], shape[2]), dtype=dpicked.dtype)   # (B·T, d)
    dhidden[rows] = dpicked
    model.backward(dhidden.reshape(shape), model_cache)         # (B, T, d)


__all__ = ["IGNORE", "labelled_loss_forward", "labelled_loss_backward", "labelled_loss_value",
           "labelled_rows"]
