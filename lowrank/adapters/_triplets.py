"""The SVD-triplet map AdaLoRA and IncreLoRA share (docs/variants.md#triplets).

    y = x W0ᵀ + b0 + c · (x_d Ãᵀ) Bᵀ,    Ã = E ⊙_rows A
It is the low-rank product of _lowrank.py with P = Ã; its dP = dÃ splits into
    dA = E ⊙_rows dÃ,   dE = Σ_cols(dÃ ⊙ A).

A class mixing this in holds ``lora_A (r, n)``, ``lora_E (r,)``, ``lora_B (m, r)`` and a
``scaling`` c.
"""
from __future__ import annotations

from ._lowrank import LowRankMap, LowRankParts


class TripletMap(LowRankMap):
    def masked_A(self):
        """``Ã = E ⊙_rows A`` (r, n)."""
        return self.lora_A.data * self.lora_E.data[:, None]

    def lowrank_parts(self) -> LowRankParts:
        return LowRankParts(self.masked_A(), self.lora_B, self.scaling,
                            need_dP=self.lora_A.trainable or self.lora_E.trainable)

    def accumulate_lowrank(self, dAt, dg) -> None:
        """Split ``dÃ (r, n)`` into ``dE = Σ_cols(dÃ ⊙ A)`` and ``dA = E ⊙_rows dÃ``."""
        A, E = self.lora_A, self.lora_E
        if E.trainable:
            E.accumulate((dAt * A.data).sum(axis=1))                     # (r,)
        if A.trainable:
            dAt *= E.data[:, None]
            A.accumulate(dAt)                                            # (r, n)
