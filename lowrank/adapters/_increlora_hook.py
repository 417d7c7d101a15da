"""IncreLoRA's schedule (docs/variants.md#increlora): module scores, the growth timetable, the budget.

One hook per model, driven by the Trainer (``IncreLoraLinear.step_hook``): it scores each
module every step until the budget is reached, and every ``incre_interval`` steps after
``init_warmup`` grows the top-h modules by ``add_r`` triplets with fresh optimizer state.
"""
from __future__ import annotations

from .. import backend
from ..hooks import StepHook


def total_budget(layers) -> int:
    """The total rank to reach: the config's ``total_budget``, else ``r`` per module."""
    cfg = layers[0][1].config
    return cfg.total_budget if cfg.total_budget is not None else sum(m.config.r for _, m in layers)


class IncreLoraHook(StepHook):
    """Scores, schedule and growth of a model's IncreLoRA layers (see lowrank.train).
    ``layers``: ``[(module name, IncreLoraLinear)]`` (``IncreLoraLinear.step_hook`` picks them)."""

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
        self.history: list = []                          # [completed step, module, k] per growth
        self._track(self.total_rank() < self.budget)
        self.beta1, self.beta2 = cfg.beta1, cfg.beta2

    def total_rank(self) -> int:
        return sum(m.ranknum for _, m in self.layers)

    def _track(self, on: bool) -> None:
        for _, m in self.layers:
            m.track_score = on
            m.end_step()

    def importance(self) -> dict:
        """``{module: Ī·Ū}`` as host floats (one sync per module; only at growth steps)."""
        return {n: float(self.ipt[n] * self.unc[n]) for n, _ in self.layers}

    def extra_loss(self, trainer) -> float:
        """Score the step (before the optimizer moves ΔW). Under data parallel ∂L/∂ΔW is first
        averaged over the ranks, so every rank scores, and grows, alike."""
        for _, m in self.layers:
            if m.grad_dW is not None:
                if trainer.comm.size > 1:
                    trainer.comm.allreduce_sum(m.grad_dW)
                    m.grad_dW *= 1.0 / trainer.comm.size
                m.score = m.step_score()
        return 0.0

    def after_step(self, trainer) -> None:
        if self.total_rank() >= self.budget:
            return
        b1, b2 = self.beta1, self.beta2
        for name, m in self.layers:
            if m.score is not None:
                self.ipt[name] = b1 * self.ipt[name] + (1.0 - b1) * m.score
                self.unc[name] = b2 * self.unc[name] + (1.0 - b2) * abs(m.score - self.ipt[name])
            m.end_step()
        done = trainer.step + 1    # trainer.step counts completed steps before this one
        cfg = self.config
        if done > cfg.init_warmup and done % cfg.incre_interval == 0:
            self.grow(trainer, done)

    def grow(self, trainer=None, step: int = -1) -> list:
        """Grow the top-h modules now; returns ``[(module, k)]``. With a trainer, the grown
        parameters restart their optimizer state."""
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
            m.grow(k)
            remaining -= k
            grown.append((name, k))
            self.history.append([int(step), name, int(k)])
            if trainer is not None:
                for p in (m.lora_A, m.lora_E, m.lora_B):   # the grown arrays start fresh
                    trainer.optimizer.reset_state(p)
        if remaining <= 0:
            self._track(False)   # budget reached: no more scores (the official hook is removed)
        return grown

    def state_dict(self) -> dict:
        return {"ipt": {n: float(v) for n, v in self.ipt.items()},
                "unc": {n: float(v) for n, v in self.unc.items()},
                "history": [list(h) for h in self.history],
                "ranks": {n: m.ranknum for n, m in self.layers},
                "rng": {n: m.host_rng_state() for n, m in self.layers}}

    def load_state_dict(self, state: dict) -> None:
        ranks = {n: m.ranknum for n, m in self.layers}
        if state["ranks"] != ranks:
            raise ValueError(f"IncreLoRA resume: the layers have ranks {ranks}, the training "
                             f"state {state['ranks']}; load the adapter weights first")
        for name, m in self.layers:
            self.ipt[name] = backend.asarray(state["ipt"][name], dtype=m.dtype, xp=m.xp)
            self.unc[name] = backend.asarray(state["unc"][name], dtype=m.dtype, xp=m.xp)
            m.set_host_rng_state(state["rng"][name])
            for p in (m.lora_A, m.lora_E, m.lora_B):   # arrays replaced after a zero-grad
                if p.grad is not None and p.grad.shape != p.shape:
                    p.grad = None
        self.history = [list(h) for h in state["history"]]
        self._track(self.total_rank() < self.budget)


__all__ = ["IncreLoraHook"]
