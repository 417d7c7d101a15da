"""The trainer's batch contract (docs/training.md#batches): what any task hands the Trainer.

A batch is any object with

    num_rows          its rows (examples): data parallel and batch shards cut along them
    tokens            the tokens it holds, as throughput counts them (a padded batch: B·T)
    take(start, stop) rows start:stop, a batch of the same kind
    to(xp)            the same batch on backend ``xp`` (an explicit host → device move)
    args              what the model's loss takes: ``loss, cache = model.loss(*batch.args)``
    loss_terms        how many terms the loss's mean is over (its rows, tokens or labelled
                      tokens): batch shards weight each share's gradient by its terms

and the model runs the backward with ``model.loss_backward(cache, dloss)``. A data source's
``batch(split, batch_size, rng)`` returns such a batch, or an ``(x, y)`` pair of token arrays
(a causal language model's), which ``as_batch`` wraps as a ``TokenBatch``. The Trainer never
looks inside: causal LM (``TokenBatch``), classification (``tasks.text_data.TextBatch``) and
a chat task (loss on assistant tokens: its batch carries the mask its model's loss reads)
plug in the same way.
"""
from __future__ import annotations

from .. import backend


class TokenBatch:
    """A causal language model's batch: ``x, y (B, T)`` int64, y the next tokens."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    @property
    def num_rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.x.size)

    @property
    def loss_terms(self) -> int:
        return int(self.y.size)     # the mean over every position

    @property
    def args(self) -> tuple:
        return (self.x, self.y)

    def take(self, start: int, stop: int) -> "TokenBatch":
        return TokenBatch(self.x[start:stop], self.y[start:stop])

    def to(self, xp) -> "TokenBatch":
        return TokenBatch(backend.asarray(self.x, xp=xp), backend.asarray(self.y, xp=xp))


def padded_width(mask) -> int:
    """The columns that hold every real token of right-padded rows (``mask (rows, T)``, 1 on
    a token): a share of a batch cut to this width computes no all-padding column."""
    return max(1, int(mask.sum(axis=1).max())) if mask.shape[0] else 1


def as_batch(value):
    """``value`` when it keeps the contract, else an ``(x, y)`` pair as a ``TokenBatch``."""
    if hasattr(value, "args") and hasattr(value, "take"):
        return value
    x, y = value
    return TokenBatch(x, y)


__all__ = ["TokenBatch", "as_batch", "padded_width"]
