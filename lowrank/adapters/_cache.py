"""What an adapted linear's forward keeps for its backward (not a variant: not auto-imported)."""
from __future__ import annotations


class AdapterCache:
    """What the skeleton's forward keeps for its backward (docs/variants.md#dropout): ``x``
    (..., n) as given; ``x2`` (N, n) what the adapter saw, flattened (``x ⊙ mask``, formed
    again from x and a one-byte ``mask`` when the forward did not keep it); ``mask`` the
    ``backend.DropoutMask`` or None; ``W_eff`` (m, n) the no-dropout branch's effective
    weight or None; ``state`` the variant's correction_forward state (dropout branch) or None."""

    __slots__ = ("x", "_x2", "mask", "W_eff", "state")

    def __init__(self, x, x2, mask, W_eff, state):
        kept = mask is None or not mask.compact
        self.x, self._x2, self.mask, self.W_eff, self.state = \
            x, (x2 if kept else None), mask, W_eff, state

    @property
    def x2(self):
        if self._x2 is not None:
            return self._x2
        return self.mask.apply(self.x).reshape(-1, self.x.shape[-1])   # (N, n)
