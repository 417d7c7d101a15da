"""Check an update before it is committed (docs/training.md#untrusted-directories): after an
optimizer step every trainable parameter and every optimizer moment must be finite, or
training stops before anything is saved. A non-finite loss is seen only one step later,
after a blown-up update could already have been written over the last good save, and finite
weights of 1e37 can still give a NaN loss: so a save is made only once the state to be saved
scores a finite loss on the first validation batch (``check_savable``).
"""
from __future__ import annotations

import math

from .. import backend
from .trainer import NonFiniteLossError


class NonFiniteUpdateError(NonFiniteLossError):
    """An optimizer step produced NaN or Inf in a parameter or the optimizer's state."""


def _arrays(obj, path: str):
    """``(dotted path, array)`` of every floating array in a nested dict/list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _arrays(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _arrays(v, f"{path}.{i}")
    elif hasattr(obj, "dtype") and getattr(obj.dtype, "kind", "") in "fc" and \
            hasattr(obj, "shape"):
        yield path, obj


def first_non_finite(model, optimizer=None):
    """``(what, name, count, size)`` of the first tensor holding NaN/Inf, or ``None``: the
    model's trainable parameters, then the optimizer's state (``optimizer.state``)."""
    found = [("parameter", name, p.data) for name, p in model.named_parameters(trainable_only=True)]
    state = getattr(optimizer, "state", None) or {}
    found += [("optimizer state", name, a) for name, a in _arrays(state, "")]
    for what, name, a in found:
        xp = backend.get_namespace(a)
        finite = xp.isfinite(a)
        if not bool(finite.all()):
            return what, name, int(a.size - int(finite.sum())), int(a.size)
    return None


def check_update(trainer, last_saved: int | None = None) -> None:
    """Raise ``NonFiniteUpdateError`` naming the tensor if the step just taken left NaN/Inf
    in the model or the optimizer (``last_saved``: the step of the save that is kept)."""
    bad = first_non_finite(trainer.model, getattr(trainer, "optimizer", None))
    if bad is None:
        return
    what, name, count, size = bad
    kept = "no checkpoint was written" if not last_saved else \
        f"the save of step {last_saved} is kept"
    raise NonFiniteUpdateError(
        f"the update of step {trainer.step} left {count} of {size} entries of {what} "
        f"{name!r} NaN or Inf; stopping before it is saved ({kept}); lower --lr or "
        "--grad-clip, or use --dtype float64")


def check_savable(trainer, last_saved: int | None = None, record: dict | None = None) -> None:
    """``check_update``, then the loss of the state about to be saved on the first validation
    batch (dropout off; ``record``'s ``val_loss`` when this step already has one) must be
    finite, or ``NonFiniteLossError`` is raised and the previous save is kept."""
    check_update(trainer, last_saved)
    loss = (record or {}).get("val_loss")
    if loss is None or not math.isfinite(loss):
        loss = first_val_batch_loss(trainer)
    if loss is not None and not math.isfinite(loss):
        kept = "no checkpoint was written" if not last_saved else \
            f"the save of step {last_saved} is kept"
        raise NonFiniteLossError(
            f"the state after step {trainer.step} scores a validation loss of {loss} (its "
            f"weights are finite but too large); stopping before it is saved ({kept}); lower "
            "--lr or --grad-clip, or use --dtype float64")


def first_val_batch_loss(trainer) -> float | None:
    """The model's loss on the first fixed validation batch (no RNG is drawn); ``None`` when
    the data have no validation batch."""
    batch = next(iter(trainer.data.eval_batches("val", trainer.config.batch_size, 1)), None)
    if batch is None:
        return None
    x, y = batch
    trainer.model.eval()
    try:
        loss, _ = trainer.model.loss(backend.asarray(x, xp=trainer.xp),
                                     backend.asarray(y, xp=trainer.xp))
    finally:
        trainer.model.train()
    return float(loss)
