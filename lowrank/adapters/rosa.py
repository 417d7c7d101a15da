"""RoSA (Nikdan et al., 2401.04679) — low-rank plus sparse adaptation — docs/variants.md#rosa.

    y = x W0ᵀ + b0 + s · (x_d Aᵀ) Bᵀ + x Sᵀ,      s = α/r

S (m, n) is sparse with a fixed support of nnz = max(1, ⌊d·m·n⌋) entries (the official code
takes ⌊d·numel⌋); its values (``rosa_values (nnz,)``, init 0) train, its support does not.
``sparse_input``: "x" (default, the official ``result += spa_module(x)``) applies S to the
undropped input, "x_d" to the dropped-out one (identical without dropout). Backward, with
G = dL/dy, u = x_d Aᵀ and x_S the input S saw:
    dB = s Gᵀ u,   du = s G B,   dA = duᵀ x_d,
    dS[i, j] = Σ_rows G[:, i] x_S[:, j]   for (i, j) in the support only (O(nnz·N)),
    dx = G (W0 + S) + (du A) ⊙ mask       ("x"; "x_d": G W0 + (du A + G S) ⊙ mask)

Support (the paper's GradMask, the official ``RosaScheduler``): ``warmup_steps`` LoRA-only
steps, then ``collect_steps`` steps during which each layer forms ``dW0 = Gᵀ x`` — only then,
and into its own accumulator, never into W0's grad: W0 stays frozen — then the top nnz
entries of the score (ties to the lower row-major index) become the support, for good.
``grad_acc_mode`` (the official option): "mean_squared" (default) scores Σ (Gᵀx)² per
backward call — per micro-batch under accumulation; under batch shards the shards' Gᵀx are
summed first (one micro-batch), under data parallel each rank squares its own and the squares
are averaged over the ranks — "mean" scores |Σ Gᵀx|. Until then S is empty and the layer is a LoRA.
``support="random"``: a random support at init (an ablation; the contract battery uses it).

``restart`` (default True, the official two-run pipeline: masks saved, then a run from
scratch with them loaded): once the support is chosen (after k steps), A and B return to their
initial values (the second run's draw, same seed), so does every other trainable parameter (a
head, biases: the second run loads the pretrained model), every AdamW state is fresh, the
batches and the dropout masks start again from the seed, and the schedule (official
``linear_decay_with_warmup``, the default here) starts again; both runs schedule over the
second run's ``steps - k`` steps (the official runs share ``max_duration``). False continues
from the warm-up state. ``lora_lr`` (official
``rosa.lora_lr``): A and B get their own AdamW (the hook's), at the run's schedule times
``lora_lr / lr`` (a param group with its own initial lr under one LambdaLR).

Storage: S is a CSR matrix (``lowrank.backend.sparse``) over ``rosa_values``: O(nnz) memory;
the support is the non-trainable int64 ``rosa_indices (nnz,)`` (flat ``i·n + j``, −1 before
selection), saved with the values. Without dropout the forward uses one effective weight
``W0 + s BA + S`` (S added on its support); with dropout S multiplies as CSR: ``(S xᵀ)ᵀ``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .. import backend
from ..backend import sparse as bsparse
from ..nn.decompose import check_rank
from ..nn.module import Parameter
from ._lowrank import LowRankMap, LowRankParts
from ._rosa_hook import RosaHook
from .base import AdaptedLinear, AdapterConfig, Report, check_int, register
from .lora import lora_factors

SUPPORTS = ("gradient", "random")
SPARSE_INPUTS = ("x", "x_d")
GRAD_ACC_MODES = ("mean_squared", "mean")


class RosaState(NamedTuple):
    u: object          # (N, r) x_d Aᵀ
    P: object          # (r, n) A as the forward used it
    pattern: object    # the support's CSRPattern, or None before selection


@dataclass
class RosaConfig(AdapterConfig):
    density: float = 0.01     # d: nnz = max(1, floor(d·m·n)) per adapted matrix
    warmup_steps: int = 0     # LoRA-only steps before the collection (official "wl<k>")
    collect_steps: int = 1    # steps whose W0 gradients score the support (spa_num_grads)
    support: str = "gradient"
    sparse_input: str = "x"   # one of SPARSE_INPUTS: S on the undropped x (official) or x_d
    grad_acc_mode: str = "mean_squared"   # one of GRAD_ACC_MODES (official spelling)
    restart: bool = True      # after selection: initial LoRA, fresh optimizer and schedule
    lora_lr: float | None = None   # A, B's own lr (official rosa.lora_lr); None: the run's

    def __post_init__(self):
        super().__post_init__()
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {d!r}")
        self.density = float(d)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("collect_steps", self.collect_steps, 1)
        for name, allowed in (("support", SUPPORTS), ("sparse_input", SPARSE_INPUTS),
                              ("grad_acc_mode", GRAD_ACC_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.restart, bool):
            raise ValueError(f"restart must be a bool, got {self.restart!r}")
        lr = self.lora_lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or not lr > 0):
            raise ValueError(f"lora_lr must be a number > 0 or None, got {lr!r}")


def support_size(density: float, m: int, n: int) -> int:
    """nnz of an (m, n) S: ⌊d·m·n⌋ (a 1e-9 guard against 0.29·100 = 28.999…), at least 1."""
    return max(1, min(m * n, int(math.floor(density * m * n + 1e-9))))


@register("rosa", RosaConfig)
class RosaLinear(LowRankMap, AdaptedLinear):
    official_schedule = "linear"   # the official config: linear_decay_with_warmup, alpha_f 0

    def init_adapter(self, rng) -> None:
        cfg, xp = self.config, self.xp
        check_rank(cfg.r, self.weight.shape)
        m, n = self.weight.shape
        self.scaling = cfg.alpha / cfg.r
        A, B, _ = lora_factors(self.weight.data, cfg.r, self.scaling, "kaiming", rng)
        self.lora_A = Parameter(A)                                       # (r, n)
        self.lora_B = Parameter(B)                                       # (m, r)
        self.initial_lora = (A.copy(), B.copy())   # what a restart returns to
        self.nnz = support_size(cfg.density, m, n)
        self.rosa_values = Parameter(xp.zeros((self.nnz,), dtype=self.dtype))      # (nnz,)
        indices = xp.full((self.nnz,), -1, dtype="int64")                          # (nnz,)
        if cfg.support == "random":
            chosen = rng.choice(m * n, size=self.nnz, replace=False)
            chosen.sort()
            indices = backend.asarray(chosen.astype("int64"), xp=xp)
        self.rosa_indices = Parameter(indices, trainable=False)
        self.collecting = False      # set by the hook for the collection steps only
        self.score = None            # (m, n) Σ (Gᵀx)² while collecting
        self.w0_grad_products = 0    # how many times Gᵀx was formed (instrumentation)
        self.defer_square = False    # batch shards: a micro-batch's Gᵀx is the shards' sum
        self.micro_dW0 = None        # (m, n) the micro-batch's raw Gᵀx while shards add up
        self.pending_dW0 = None      # (m, n) this step's Σ over micro-batches of (Gᵀx)²
        self.across_ranks = False    # data parallel: the hook averages pending over ranks
        self._pattern, self._pattern_src = None, None

    # --- the support -----------------------------------------------------------------------
    @property
    def pattern(self):
        """The CSRPattern of the chosen support, or None before selection. Rebuilt when the
        indices array is replaced (selection, ``load_adapter``)."""
        data = self.rosa_indices.data
        if data is not self._pattern_src:
            chosen = data.shape[0] > 0 and int(data[0]) >= 0
            self._pattern = bsparse.CSRPattern.from_flat(data, self.weight.shape) \
                if chosen else None
            self._pattern_src = data
        return self._pattern

    @property
    def support_selected(self) -> bool:
        return self.pattern is not None

    def sparse_matrix(self):
        """S as the backend's CSR matrix over ``rosa_values`` (shared), or None."""
        pattern = self.pattern
        return None if pattern is None else pattern.matrix(self.rosa_values.data)

    def select_support(self) -> None:
        """Fix the support to the top-nnz entries of the collected score; values restart at 0."""
        if self.score is None:
            raise RuntimeError("select_support() needs collected W0 gradients (score is None)")
        score = self.score if self.config.grad_acc_mode == "mean_squared" \
            else self.xp.abs(self.score)
        flat = bsparse.top_k_flat(score, self.nnz)                       # (nnz,)
        self.rosa_indices.data = flat
        self.rosa_values.data = self.xp.zeros((self.nnz,), dtype=self.dtype)
        self.score, self.collecting = None, False

    def restart_lora(self) -> None:
        """A and B back to their initial values (the official second run's init)."""
        A, B = self.initial_lora
        self.lora_A.data, self.lora_B.data = A.copy(), B.copy()

    def add_score(self, dW0) -> None:
        """``score += dW0²`` ("mean_squared") or ``score += dW0`` ("mean"); ``dW0`` is
        consumed."""
        if self.config.grad_acc_mode == "mean_squared":
            dW0 *= dW0
        if self.score is None:
            self.score = dW0
        else:
            self.score += dW0

    # --- the adapted map: the LoRA product (_lowrank.py) plus S ---------------------------------
    def lowrank_parts(self) -> LowRankParts:
        return LowRankParts(self.lora_A.data, self.lora_B, self.scaling,
                            need_dP=self.lora_A.trainable)

    def accumulate_lowrank(self, dA, dg) -> None:
        self.lora_A.accumulate(dA)                                       # (r, n)

    fused_correction = False   # the correction adds the sparse part too (_correction below)

    def has_delta_path(self) -> bool:
        return False   # the multi-adapter path keeps running RoSA through forward/backward

    def _on_x(self) -> bool:
        return self.config.sparse_input == "x"

    def _correction(self, x, x_d, mask):
        """The dropout branch: ``s (x_d Aᵀ) Bᵀ + x_S Sᵀ`` (…, m), x_S = x or x_d."""
        delta, cache = super()._correction(x, x_d, mask)
        pattern = cache.state.pattern
        if pattern is not None and self._on_x():
            x_flat = x.reshape(-1, self.in_features)                     # (N, n)
            S = pattern.matrix(self.rosa_values.data)
            delta += bsparse.matmul(S, x_flat.T).T.reshape(delta.shape)  # (m, N)ᵀ
        return delta, cache

    def correction_forward(self, x2):
        """``s (x_d Aᵀ) Bᵀ`` (N, m), plus ``x_d Sᵀ`` for sparse_input="x_d"; S multiplies
        as CSR: ``(S x_dᵀ)ᵀ``."""
        delta, state = super().correction_forward(x2)                    # (N, m)
        pattern = self.pattern
        if pattern is not None and not self._on_x():
            S = pattern.matrix(self.rosa_values.data)
            delta += bsparse.matmul(S, x2.T).T                           # (m, N)ᵀ
        return delta, RosaState(state.u, state.P, pattern)

    def base_input_grad(self, dy, dx_adapter):
        """``G (W0 + S) + dx_adapter`` when S sees the undropped x (its dx is not masked)."""
        dx = super().base_input_grad(dy, dx_adapter)                     # (..., n)
        S = self.sparse_matrix() if self._on_x() else None
        if S is not None:
            dy2 = dy.reshape(-1, self.out_features)                      # (N, m)
            dx += bsparse.matmul(S, dy2.T, transpose=True).T.reshape(dx.shape)   # G S
        return dx

    def correction_backward(self, dy2, cache, need_dx: bool):
        """The LoRA gradients, dS on the support (O(nnz·N)), and while collecting the score's
        ``Gᵀ x`` — the only place it is formed; W0 itself gets no gradient."""
        dx = super().correction_backward(dy2, cache, need_dx)            # (N, n) du A
        pattern = self.pattern if cache.state is None else cache.state.pattern
        x_flat = cache.x.reshape(-1, self.in_features)                   # (N, n) undropped
        if pattern is not None and self.rosa_values.trainable:
            x_S = x_flat if self._on_x() else cache.x2
            self.rosa_values.accumulate(
                bsparse.support_grad(dy2, x_S, pattern.rows, pattern.indices))   # (nnz,)
        if self.collecting:
            self._collect(dy2.T @ x_flat)                                # (m, n) = Gᵀ x
        if need_dx and pattern is not None and not self._on_x():   # "x": base_input_grad
            S = pattern.matrix(self.rosa_values.data)
            dx += bsparse.matmul(S, dy2.T, transpose=True).T             # (n, N)ᵀ = G S
        return dx

    def reset_replica_state(self) -> None:
        """A batch shard keeps its raw Gᵀx apart: the micro-batch's is the sum over the
        shards, squared once, as the official hook squares each backward's."""
        self.pending_dW0, self.micro_dW0, self.w0_grad_products = None, None, 0
        self.defer_square = True

    def absorb_replica(self, replica) -> None:
        self.w0_grad_products += replica.w0_grad_products
        if replica.micro_dW0 is None:
            return
        if self.micro_dW0 is None:
            raise RuntimeError("RoSA collects its score over batch shards only with "
                               "defer_square set (the Trainer sets it for shards > 1)")
        self.micro_dW0 += replica.micro_dW0

    def _collect(self, dW0) -> None:
        """One backward's Gᵀx: squared ("mean_squared") and added to the step's pending sum,
        or, under batch shards, kept raw until the micro-batch's shards are summed."""
        self.w0_grad_products += 1
        if self.defer_square:
            self.flush_micro()   # the previous micro-batch, now complete
            self.micro_dW0 = dW0
        else:
            self._pend(dW0)

    def _pend(self, dW0) -> None:
        if not self.across_ranks:
            self.add_score(dW0)
            return
        if self.config.grad_acc_mode == "mean_squared":
            dW0 *= dW0
        if self.pending_dW0 is None:
            self.pending_dW0 = dW0
        else:
            self.pending_dW0 += dW0

    def flush_micro(self) -> None:
        if self.micro_dW0 is not None:
            micro, self.micro_dW0 = self.micro_dW0, None
            self._pend(micro)

    def effective_weight(self):
        """``W0 + s·BA + S`` (m, n); S's values are added on its support, O(nnz)."""
        W_eff = self.lowrank_delta()                                     # (m, n)
        W_eff += self.weight.data
        if self.pattern is not None:
            flat = W_eff.reshape(-1)                                     # (m·n,) view
            flat[self.rosa_indices.data] += self.rosa_values.data       # unique indices
        return W_eff

    def delta_weight(self):
        delta = self.lowrank_delta()                                     # (m, n)
        S = self.sparse_matrix()
        if S is not None:
            delta += bsparse.to_dense(S)
        return delta

    # --- reporting -----------------------------------------------------------------------------
    def sparse_nbytes(self) -> dict:
        """Bytes of S as CSR (data + indices + indptr) against a dense ΔW (m·n·itemsize)."""
        m, n = self.weight.shape
        itemsize = int(self.weight.data.itemsize)
        if self.pattern is not None:
            sizes = self.pattern.nbytes(itemsize)
        else:   # what the CSR will take once chosen: int32 indices and indptr
            sizes = {"data": self.nnz * itemsize, "indices": 4 * self.nnz, "indptr": 4 * (m + 1)}
            sizes["total"] = sum(sizes.values())
        return {**sizes, "dense": m * n * itemsize}

    def _facts(self) -> dict:
        b = self.sparse_nbytes()
        return {"nnz": self.nnz, "density": self.nnz / (self.out_features * self.in_features),
                "support_selected": self.support_selected, "sparse_bytes": b["total"],
                "dense_bytes": b["dense"]}

    def adapter_metadata(self) -> dict:
        return {"nnz": self.nnz, "support_selected": self.support_selected}

    @classmethod
    def report(cls, model, out) -> Report:
        lines = []
        for name, m in cls.layers_of(model):
            b = m.sparse_nbytes()
            state = "" if m.support_selected else " (support not selected yet)"
            lines.append(f"rosa {name}: S nnz {m.nnz}, CSR {b['total']:,} B vs dense "
                         f"{b['dense']:,} B ({100.0 * b['total'] / b['dense']:.2f}%){state}")
        return Report(lines, {name: m._facts() for name, m in cls.layers_of(model)})

    @classmethod
    def step_hook(cls, model):
        return RosaHook(cls.layers_of(model))
