"""IncreLoRA's schedule (docs/variants.md#increlora): reserves, module scores, growth, the
orthogonality regulariser and the triplets' own AdamW.

One hook per model, driven by the Trainer (``IncreLoraLinear.step_hook``), following the
official ``RankAllocator.update_and_increase`` (called at 0-based step g after the backward,
before the optimizer step):

* g = 0: every module gets ``add_r`` reserve triplets (``add_reserve_param``);
* while Σ ranknum < budget: Ī ← β1 Ī + (1-β1) s, Ū ← β2 Ū + (1-β2) |s - Ī| with the step's
  score s; at g > init_warmup with g % incre_interval == 0 the ``top_h`` modules of highest
  Ī·Ū (ties: model order) that have room each activate ``add_r`` reserves (fewer for the last,
  so the total lands on the budget) and draw as many new ones; at the budget every reserve's
  E is set to 0 and scoring stops.

The hook steps A, E, B itself (the trainer's AdamW leaves them out) because the official
triplets are separate tensors, each with its own torch-AdamW state: one state per triplet
here (block 0, the ``init_r`` first triplets, shares one step counter as the official first
tensor does). A triplet's tensors step only when they take part in the backward: A, B of
active triplets and, with advance learning, of reserves; E of active triplets only (a
reserve's E is frozen, and an activated E first steps at the next step). Triplets added
after the start are official ``add_param_group`` groups, which the LambdaLR built before
them never reaches: ``reserve_lr="constant"`` runs them at the base lr, "schedule" at the
trainer's scheduled lr.

Orthogonality (``reg_orth_coef`` w, the official ``compute_orth_regu`` over the per-triplet
tensors): R = w/K Σ_T ‖M_T‖_F over every A and B tensor T of every module (K of them), with
M = T Tᵀ - I for A's, Tᵀ T - I for B's; a one-triplet tensor gives |‖a‖² - 1|. Gradient
(2/‖M‖) M T on the trainable tensors, added before clipping.
"""
from __future__ import annotations

from .. import backend
from ..nn.hooks import StepHook

_BETAS, _EPS = (0.9, 0.999), 1e-8      # torch/HF AdamW defaults, as the official trainer


def total_budget(layers) -> int:
    """The total rank to reach: the config's ``total_budget``, else ``r`` per module."""
    cfg = layers[0][1].config
    return cfg.total_budget if cfg.total_budget is not None else sum(m.config.r for _, m in layers)


def _blocks(m):
    """Row ranges of the official tensors: the first ``init_r`` rows, then one per triplet."""
    first = min(m.config.init_r, m.rows)
    return [(0, first)] + [(i, i + 1) for i in range(first, m.rows)]


def orth_value_and_grad(T, rows: bool):
    """``‖M‖_F`` and its gradient for one tensor (rows: A-like (k, n), else B-like (m, k))."""
    xp = backend.get_namespace(T)
    M = T @ T.T if rows else T.T @ T                                    # (k, k)
    M = M - xp.eye(M.shape[0], dtype=T.dtype)
    norm = float(xp.sqrt((M * M).sum()))
    if norm == 0.0:
        return 0.0, xp.zeros_like(T)
    return norm, (2.0 / norm) * (M @ T if rows else T @ M)


class IncreLoraHook(StepHook):
    """Reserves, scores, growth, the regulariser and the triplets' AdamW (see lowrank.training.trainer).
    ``layers``: ``[(module name, IncreLoraLinear)]``."""

    def __init__(self, layers):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("the model holds no IncreLoRA layers")
        self.config = cfg = self.layers[0][1].config
        self.budget = total_budget(self.layers)
        start = self.total_rank()
        room = sum(m.capacity for _, m in self.layers)
        if self.budget < start:
            raise ValueError(f"total_budget must be >= the starting total rank {start} "
                             f"(Σ init_r over {len(self.layers)} modules), got {self.budget}")
        if self.budget > room:
            raise ValueError(f"total_budget must be <= Σ min(m, n) = {room} over the adapted "
                             f"modules, got {self.budget}")
        zero = lambda m: m.xp.zeros((), dtype=m.dtype)   # noqa: E731 (0-d, on the device)
        self.ipt = {n: zero(m) for n, m in self.layers}  # Ī, smoothed sensitivity
        self.unc = {n: zero(m) for n, m in self.layers}  # Ū, smoothed uncertainty
        self.history: list = []                          # [step g, module, k] per growth
        self.opt: dict = {n: self._fresh_state(m, 0, m.rows, True) for n, m in self.layers}
        self._track(self.total_rank() < self.budget)
        self.beta1, self.beta2 = cfg.beta1, cfg.beta2

    # --- bookkeeping -----------------------------------------------------------------------
    def total_rank(self) -> int:
        return sum(m.ranknum for _, m in self.layers)

    def _track(self, on: bool) -> None:
        for _, m in self.layers:
            m.track_score = on
            m.end_step()

    def owns(self, name, p) -> bool:
        return any(p is q for _, m in self.layers for q in (m.lora_A, m.lora_E, m.lora_B))

    def importance(self) -> dict:
        """``{module: Ī·Ū}`` as host floats (one sync per module; only at growth steps)."""
        return {n: float(self.ipt[n] * self.unc[n]) for n, _ in self.layers}

    @staticmethod
    def _fresh_state(m, lo: int, hi: int, scheduled: bool) -> dict:
        """AdamW state of rows lo..hi: moments 0, step 0 (A: rows, E: entries, B: columns)."""
        xp, k, (rows_m, n) = m.xp, hi - lo, m.weight.shape
        zeros = lambda *shape: xp.zeros(shape, dtype=m.dtype)   # noqa: E731
        return {"A": [zeros(k, n), zeros(k, n)], "E": [zeros(k), zeros(k)],
                "B": [zeros(rows_m, k), zeros(rows_m, k)],
                "tA": [0] * k, "tE": [0] * k, "tB": [0] * k, "scheduled": [scheduled] * k}

    def _extend_state(self, name, m, k: int) -> None:
        st, new = self.opt[name], self._fresh_state(m, 0, k, False)
        xp = m.xp
        for key, axis in (("A", 0), ("E", 0), ("B", 1)):
            st[key] = [xp.concatenate([a, b], axis=axis) for a, b in zip(st[key], new[key])]
        for key in ("tA", "tE", "tB", "scheduled"):
            st[key] = st[key] + new[key]

    # --- the step ----------------------------------------------------------------------------
    def extra_loss(self, trainer) -> float:
        """Freeze what the official code freezes, score the step (before the optimizer moves
        ΔW; under data parallel ∂L/∂ΔW is first averaged over the ranks), then the
        orthogonality regulariser; returns its value."""
        for _, m in self.layers:
            if m.lora_E.grad is not None:
                m.lora_E.grad[m.ranknum:] = 0.0                          # reserve E frozen
            if not m.config.advance_learning:
                if m.lora_A.grad is not None:
                    m.lora_A.grad[m.ranknum:] = 0.0
                if m.lora_B.grad is not None:
                    m.lora_B.grad[:, m.ranknum:] = 0.0
            if m.grad_dW is not None:
                if trainer.comm.size > 1:
                    trainer.comm.allreduce_sum(m.grad_dW)
                    m.grad_dW *= 1.0 / trainer.comm.size
                m.score = m.step_score()
        return self.orth_regulariser()

    def orth_regulariser(self) -> float:
        w = self.config.reg_orth_coef
        if w == 0.0:
            return 0.0
        terms = []
        for _, m in self.layers:
            train_reserve = m.config.advance_learning
            for lo, hi in _blocks(m):
                trainable = hi <= m.ranknum or train_reserve
                terms.append((m.lora_A, (slice(lo, hi), slice(None)), True, trainable))
                terms.append((m.lora_B, (slice(None), slice(lo, hi)), False, trainable))
        total, K = 0.0, len(terms)
        for p, index, rows, trainable in terms:
            value, grad = orth_value_and_grad(p.data[index], rows)
            total += value
            if trainable and p.trainable:
                if p.grad is None:
                    p.grad = backend.get_namespace(p.data).zeros_like(p.data)
                p.grad[index] += (w / K) * grad
        return w * total / K

    def after_step(self, trainer) -> None:
        g = trainer.step                  # 0-based index of the step that just ran
        self.step_triplets(trainer)
        if g == 0 and all(m.reserve == 0 for _, m in self.layers):
            for name, m in self.layers:
                self._extend_state(name, m, m.config.add_r)
                m.add_reserve(m.config.add_r)
        if self.total_rank() >= self.budget:
            return
        b1, b2 = self.beta1, self.beta2
        for name, m in self.layers:
            if m.score is not None:
                self.ipt[name] = b1 * self.ipt[name] + (1.0 - b1) * m.score
                self.unc[name] = b2 * self.unc[name] + (1.0 - b2) * abs(m.score - self.ipt[name])
            m.end_step()
        cfg = self.config
        if g > cfg.init_warmup and g % cfg.incre_interval == 0:
            self.grow(trainer, g)

    def step_triplets(self, trainer) -> None:
        """torch-AdamW on every triplet tensor that took part in the backward."""
        c = trainer.config
        lr_sched = trainer.lr_at(trainer.step)
        lr_added = c.lr if self.config.reserve_lr == "constant" else lr_sched
        b1, b2 = _BETAS
        for name, m in self.layers:
            st, xp = self.opt[name], m.xp
            live_AB = m.rows if m.config.advance_learning else m.ranknum
            for key, p, live, axis in (("A", m.lora_A, live_AB, 0), ("E", m.lora_E, m.ranknum, 0),
                                       ("B", m.lora_B, live_AB, 1)):
                if not p.trainable or p.grad is None or live == 0:
                    continue
                steps = st["t" + key]
                for i in range(live):
                    steps[i] += 1
                t = xp.asarray(steps[:live], dtype=p.dtype)             # (live,)
                lr = xp.asarray([lr_sched if s else lr_added for s in st["scheduled"][:live]],
                                dtype=p.dtype)                          # (live,)
                if axis == 0 and key == "A":
                    t, lr = t[:, None], lr[:, None]                     # (live, 1)
                rows = (slice(None), slice(0, live)) if axis == 1 else slice(0, live)
                data, grad = p.data[rows], p.grad[rows]
                m1, v1 = st[key][0][rows], st[key][1][rows]
                if c.weight_decay:
                    data *= 1.0 - lr * c.weight_decay
                m1 += (grad - m1) * (1.0 - b1)
                v1 *= b2
                v1 += (grad * grad) * (1.0 - b2)
                denom = xp.sqrt(v1) / xp.sqrt(1.0 - b2 ** t) + _EPS
                data -= (lr / (1.0 - b1 ** t)) * m1 / denom

    def grow(self, trainer=None, step: int = -1) -> list:
        """Grow the top-h modules now; returns ``[(module, k)]``."""
        scores = self.importance()
        order = sorted(range(len(self.layers)), key=lambda i: (-scores[self.layers[i][0]], i))
        remaining, grown = self.budget - self.total_rank(), []
        for i in order:
            name, m = self.layers[i]
            if remaining <= 0 or len(grown) == self.config.top_h:
                break
            k = min(self.config.add_r, remaining, m.capacity - m.ranknum)
            if k < 1:
                continue
            if m.reserve < k:
                self._extend_state(name, m, k - m.reserve)
            lo = m.ranknum
            m.grow(k)
            st = self.opt[name]
            for j in range(lo, lo + k):      # the activated E: a new param group
                st["tE"][j] = 0
                st["E"][0][j] = st["E"][1][j] = 0.0
                if not m.config.advance_learning:   # A, B enter the optimizer now
                    st["tA"][j] = st["tB"][j] = 0
            self._extend_state(name, m, k)   # k new reserves
            m.add_reserve(k)
            remaining -= k
            grown.append((name, k))
            self.history.append([int(step), name, int(k)])
        if remaining <= 0:
            for _, m in self.layers:
                m.switch_off_reserves()
            self._track(False)   # budget reached: no more scores (the official hook is removed)
        return grown

    # --- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        opt = {n: {k: ([backend.to_numpy(a).copy() for a in v] if k in "AEB" else list(v))
                   for k, v in st.items()} for n, st in self.opt.items()}
        return {"ipt": {n: float(v) for n, v in self.ipt.items()},
                "unc": {n: float(v) for n, v in self.unc.items()},
                "history": [list(h) for h in self.history],
                "ranks": {n: m.ranknum for n, m in self.layers},
                "rows": {n: m.rows for n, m in self.layers},
                "rng": {n: m.host_rng_state() for n, m in self.layers}, "opt": opt}

    def load_state_dict(self, state: dict) -> None:
        ranks = {n: m.ranknum for n, m in self.layers}
        rows = {n: m.rows for n, m in self.layers}
        if state["ranks"] != ranks or state.get("rows", state["ranks"]) != rows:
            raise ValueError(f"IncreLoRA resume: the layers have ranks {ranks}, the training "
                             f"state {state['ranks']}; load the adapter weights first")
        for name, m in self.layers:
            self.ipt[name] = backend.asarray(state["ipt"][name], dtype=m.dtype, xp=m.xp)
            self.unc[name] = backend.asarray(state["unc"][name], dtype=m.dtype, xp=m.xp)
            m.set_host_rng_state(state["rng"][name])
            for p in (m.lora_A, m.lora_E, m.lora_B):   # arrays replaced after a zero-grad
                if p.grad is not None and p.grad.shape != p.shape:
                    p.grad = None
            saved = state["opt"][name]
            self.opt[name] = {k: ([backend.asarray(a, dtype=m.dtype, xp=m.xp) for a in v]
                                  if k in "AEB" else list(v)) for k, v in saved.items()}
        self.history = [list(h) for h in state["history"]]
        self._track(self.total_rank() < self.budget)


__all__ = ["IncreLoraHook", "orth_value_and_grad"]
