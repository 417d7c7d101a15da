"""``StepHook``: what the training loop calls around each optimizer step
(docs/training.md#step-order).

One step of ``lowrank.training.trainer.Trainer``, always in this order:

    forward/backward (× accum_steps) → extra_loss → clip → optimizer step → after_step → zero-grad

A hook overrides the methods it needs; every default does nothing, so the trainer calls all
of them on every hook. An adapter class that needs a hook returns one from
``AdaptedLinear.step_hook(model)``; ``lowrank.training.trainer.hooks_for`` collects them.
"""
from __future__ import annotations


class StepHook:
    """Per-step extension point of the trainer; every method has a no-op default."""

    def bind(self, trainer) -> None:
        """Called once when the trainer is built, before step 1 (to learn ``trainer.comm``)."""

    def owns(self, name: str, param) -> bool:
        """Whether the hook steps ``param`` itself, keeping it out of the optimizer (default:
        no)."""
        return False

    def extra_loss(self, trainer) -> float:
        """After the backward, before clipping: accumulate a regulariser's gradients and return
        its value (reported apart from the loss). Default: 0.0, no gradient."""
        return 0.0

    def lr_at(self, trainer, step: int, lr: float) -> float:
        """Reshape the learning rate of 0-based ``step`` (``lr`` is the schedule's, after the
        hooks before this one). Default: ``lr`` unchanged."""
        return lr

    def after_step(self, trainer) -> None:
        """After the optimizer step, before zero-grad (masks, rank growth, restarts)."""

    def state_dict(self):
        """What a resumed run must restore (host arrays and JSON-able values), or None when
        the hook holds no state (the default)."""
        return None

    def load_state_dict(self, state) -> None:
        """Restore a ``state_dict()``; never called with None. Default: nothing to restore."""
