"""RoSA's step hook (docs/variants.md#rosa): warm-up, the collection of W0's gradient score,
support selection and the optional restart, driven by the Trainer (``RosaLinear.step_hook``)."""
from __future__ import annotations

from .. import backend
from ..nn.hooks import StepHook
from ..nn.optim import AdamW, lr_at


class RosaHook(StepHook):
    """Warm-up → collection → support selection, driven by the Trainer (one per model).

    Step k (1-based) collects when ``warmup < k <= warmup + collect``; after step
    ``warmup + collect`` each layer still without a support selects one.
    """

    def __init__(self, layers):
        self.layers = list(layers)   # [(name, RosaLinear)]: RosaLinear.layers_of(model)
        self.lora_opt = None       # A and B's own AdamW with lora_lr (set by bind)
        self.steps_done = 0
        self.restarted_at = None   # completed steps when the run restarted (restart=True)
        self._arm()

    def bind(self, trainer) -> None:
        """Under data parallel each rank sees a slice of the batch: square the rank-averaged
        Gᵀx (what one process computes), not each rank's own. With ``lora_lr`` the LoRA
        factors get their own AdamW."""
        self.comm = trainer.comm
        for _, m in self.layers:   # batch shards split the batch the same way
            m.defer_square = trainer.comm.size > 1 or trainer.config.shards > 1
        self.lora_opt = None
        if self.layers and self.layers[0][1].config.lora_lr is not None:
            self.lora_opt = AdamW([(f"{n}.{k}", getattr(m, k)) for n, m in self.layers
                                   for k in ("lora_A", "lora_B") if getattr(m, k).trainable],
                                  lr=self.layers[0][1].config.lora_lr,
                                  weight_decay=trainer.config.weight_decay)

    def owns(self, name, p) -> bool:
        return self.lora_opt is not None and self.lora_opt.name_of(p) is not None

    def extra_loss(self, trainer) -> float:
        for _, m in self.layers:
            if m.pending_dW0 is not None:
                pending, m.pending_dW0 = m.pending_dW0, None
                trainer.comm.allreduce_sum(pending)
                pending *= 1.0 / trainer.comm.size
                m.add_score(pending)
        return 0.0

    def _arm(self) -> None:
        """Switch the W0-gradient collection on exactly for the coming step k (1-based)."""
        k = self.steps_done + 1
        for _, m in self.layers:
            cfg = m.config
            m.collecting = (cfg.support == "gradient" and not m.support_selected
                            and cfg.warmup_steps < k <= cfg.warmup_steps + cfg.collect_steps)

    def lr_at(self, trainer, step: int, lr: float) -> float:
        """After a restart the schedule starts again: warm-up and cosine over the steps
        left, as the official second run's own schedule."""
        k = self.restarted_at
        if k is None or step < k:
            return lr
        c = trainer.config
        return lr_at(step - k, c.lr, c.warmup, max(1, c.steps - k), c.min_lr)

    def after_step(self, trainer) -> None:
        if self.lora_opt is not None:
            c = trainer.config
            ratio = self.lora_opt.lr / c.lr if c.lr > 0 else 1.0
            self.lora_opt.step(trainer.lr_at(trainer.step) * ratio)
        self.steps_done = trainer.step + 1
        selected = []
        for name, m in self.layers:
            cfg = m.config
            if (self.steps_done == cfg.warmup_steps + cfg.collect_steps
                    and cfg.support == "gradient" and not m.support_selected):
                m.select_support()
                selected.append(m)
                # the values enter training now: their AdamW state starts fresh (bias
                # correction from t = 1), whatever zero-gradient steps it counted before
                trainer.optimizer.reset_state(m.rosa_values)
        if selected and selected[0].config.restart:
            self.restart(trainer.optimizer)
        self._arm()

    def restart(self, optimizer) -> None:
        """The official second run: initial LoRA, every optimizer state fresh, the schedule
        from its start (``lr_at``); the supports stay."""
        for _, m in self.layers:
            m.restart_lora()
        for opt in (optimizer, self.lora_opt):
            for p in list(opt.params.values()) if opt is not None else ():
                opt.reset_state(p)
        self.restarted_at = self.steps_done

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "restarted_at": self.restarted_at,
                "lora_opt": None if self.lora_opt is None else self.lora_opt.state_dict(),
                "scores": {name: backend.to_numpy(m.score).copy()
                           for name, m in self.layers if m.score is not None}}

    def load_state_dict(self, state: dict) -> None:
        modules = dict(self.layers)
        unknown = sorted(set(state.get("scores", {})) - set(modules))
        if unknown:
            raise ValueError(f"RoSA score state for unknown modules: {unknown}")
        self.steps_done = int(state["steps_done"])
        at = state.get("restarted_at")
        self.restarted_at = None if at is None else int(at)
        if self.lora_opt is not None and state.get("lora_opt") is not None:
            self.lora_opt.load_state_dict(state["lora_opt"])
        for name, m in self.layers:
            score = state.get("scores", {}).get(name)
            m.score = None if score is None else backend.asarray(score, dtype=m.dtype, xp=m.xp)
        self._arm()
