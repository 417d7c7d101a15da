"""The SVD-triplet map AdaLoRA (SPEC §2.4) and IncreLoRA (§2.7) share.

    y = x W0ᵀ + b0 + c · (x_d Ãᵀ) Bᵀ,    Ã = E ⊙_rows A,   u = x_d Ãᵀ
    dB = c Gᵀ u,   du = c G B,   dÃ = duᵀ x_d,   dA = E ⊙_rows dÃ,   dE = Σ_cols(dÃ ⊙ A),
    dx = G W0 + (du Ã) ⊙ mask          (without dropout: dx = G (W0 + c B Ã))

A class mixing this in holds ``lora_A (r, n)``, ``lora_E (r,)``, ``lora_B (m, r)`` and a
``scaling`` c; its ``adapter_backward`` wraps ``triplet_backward`` with its own bookkeeping.
"""
from __future__ import annotations

from ..ops.linear import linear_forward
from ._delta import lowrank_delta_backward, lowrank_delta_forward


class TripletMap:
    def masked_A(self):
        """``Ã = E ⊙_rows A`` (r, n)."""
        return self.lora_A.data * self.lora_E.data[:, None]

    def adapter_forward(self, x, dropout_mask):
        x_d, mask = self.dropout(x, dropout_mask)
        At = self.masked_A()                                             # (r, n)
        if mask is None:   # one (m, n) weight: m·n·r to form, one pass over y
            W_eff = (self.scaling * self.lora_B.data) @ At               # (m, n)
            W_eff += self.weight.data
            y, _ = linear_forward(x, W_eff, self._bias_data())           # (..., m)
            return y, (x, None, None, At, W_eff)
        y, _ = linear_forward(x, self.weight.data, self._bias_data())   # (..., m)
        u = x_d.reshape(-1, self.in_features) @ At.T                     # (N, r)
        y += (self.scaling * (u @ self.lora_B.data.T)).reshape(y.shape)  # (..., m)
        return y, (x_d, mask, u, At, None)

    def triplet_backward(self, dy, cache):
        """Accumulate dA, dE, dB; return dx (``None`` when ``need_input_grad`` is off)."""
        x_d, mask, u, At, W_eff = cache
        A, E, B, c = self.lora_A, self.lora_E, self.lora_B, self.scaling
        r, n = A.shape
        m = B.shape[0]
        x2 = x_d.reshape(-1, n)                                          # (N, n)
        dy2 = dy.reshape(-1, m)                                          # (N, m)
        if B.trainable:
            u2 = x2 @ At.T if u is None else u.reshape(-1, r)            # (N, r)
            dB = dy2.T @ u2                                              # (m, r)
            dB *= c
            B.accumulate(dB)
        du = dy2 @ B.data                                                # (N, r)
        du *= c
        if A.trainable or E.trainable:
            self.accumulate_masked_grad(du.T @ x2)                       # dÃ (r, n)
        if not self.need_input_grad:
            return None
        if W_eff is not None:   # G (W0 + c B Ã) = G W0 + du Ã
            return (dy2 @ W_eff).reshape(x_d.shape)                      # (..., n)
        dx = (dy2 @ self.weight.data).reshape(x_d.shape)                 # (..., n)
        dx_adapter = (du @ At).reshape(dx.shape)                         # (..., n)
        dx_adapter *= mask
        dx += dx_adapter
        return dx

    def accumulate_masked_grad(self, dAt) -> None:
        """Split ``dÃ (r, n)`` into ``dE = Σ_cols(dÃ ⊙ A)`` and ``dA = E ⊙_rows dÃ``."""
        A, E = self.lora_A, self.lora_E
        if E.trainable:
            E.accumulate((dAt * A.data).sum(axis=1))                     # (r,)
        if A.trainable:
            dAt *= E.data[:, None]
            A.accumulate(dAt)                                            # (r, n)

    # --- multi-adapter fast path (lowrank.parallel.multi; formulas in adapters/_delta.py) ------
    def delta_forward(self, x, dropout_mask):
        """``(Δy, cache)`` with ``adapter_forward(x) = x W0ᵀ + b0 + Δy`` (P = Ã)."""
        return lowrank_delta_forward(self, x, dropout_mask, self.masked_A(), self.lora_B.data,
                                     self.scaling)

    def delta_triplet_backward(self, dy, cache):
        """``delta_backward`` of the triplets: A, E, B gradients; returns dx_Δ."""
        A, E = self.lora_A, self.lora_E
        dAt, _, dx = lowrank_delta_backward(dy, cache, self.lora_B,
                                            need_dP=A.trainable or E.trainable)
        if dAt is not None:
            self.accumulate_masked_grad(dAt)
        return dx
