"""The training loop: AdamW, clipping, warm-up + cosine, accumulation, evaluation, hooks.

One step, always in this order (SPEC §2.4; schedule-driven variants depend on it):

    forward/backward (× accum_steps) → hooks.extra_loss (regularisers add their gradients)
    → clip → optimizer step → hooks.after_step (masks, rank growth, restarts) → zero-grad

Hooks are plain objects with any of these methods:

* ``extra_loss(trainer) -> float``: add a regulariser's value and accumulate its gradients;
* ``after_step(trainer)``: after the optimizer step, before zero-grad (masks, growth, restarts);
* ``lr_at(trainer, step, lr) -> float``: reshape the learning-rate schedule;
* ``owns(name, param) -> bool``: parameters the hook steps itself, kept out of AdamW;
* ``state_dict()`` / ``load_state_dict(state)``: what ``--resume`` must restore.

An adapter class that needs one defines ``step_hook(model)`` (a classmethod); ``hooks_for``
hands it to the trainer, so no user has to remember to call it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import backend
from .optim import AdamW, clip_grad_norm, lr_at


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    accum_steps: int = 1
    eval_interval: int = 0        # 0: evaluate only when asked
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "accum_steps", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup", "eval_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            if not float(getattr(self, name)) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")

    def to_dict(self) -> dict:
        return asdict(self)


def hooks_for(model) -> list:
    """The per-step hooks the model's adapters ask for (``adapter.step_hook(model)``)."""
    from .adapters import adapted_modules
    hooks, seen = [], set()
    for _, module in adapted_modules(model):
        make = getattr(type(module), "step_hook", None)
        if make is not None and type(module) not in seen:
            seen.add(type(module))
            hooks.append(make(model))
    return hooks


class Trainer:
    def __init__(self, model, data, config: TrainConfig, hooks=None):
        self.model, self.data, self.config = model, data, config
        self.hooks = hooks_for(model) if hooks is None else list(hooks)
        owned = [h.owns for h in self.hooks if hasattr(h, "owns")]
        self.optimizer = AdamW([(n, p) for n, p in model.named_parameters(trainable_only=True)
                                if not any(owns(n, p) for owns in owned)],
                               lr=config.lr, weight_decay=config.weight_decay)
        if not self.optimizer.params:
            raise ValueError("the model has no trainable parameters")
        self.rng = np.random.Generator(np.random.PCG64(config.seed))   # host: batch sampling
        self.step = 0
        self.tokens_seen = 0
        model.train()
        model.zero_grad()

    @property
    def xp(self):
        return self.model.xp

    def lr_at(self, step: int) -> float:
        c = self.config
        lr = lr_at(step, c.lr, c.warmup, c.steps, c.min_lr)
        for hook in self.hooks:
            if hasattr(hook, "lr_at"):
                lr = hook.lr_at(self, step, lr)
        return lr

    def batch(self, split: str, rng):
        x, y = self.data.batch(split, self.config.batch_size, rng)
        return backend.asarray(x, xp=self.xp), backend.asarray(y, xp=self.xp)

    def train_step(self) -> dict:
        c, model = self.config, self.model
        start = time.perf_counter()
        loss = 0.0
        for _ in range(c.accum_steps):
            x, y = self.batch("train", self.rng)
            micro_loss, cache = model.loss(x, y)
            if not math.isfinite(micro_loss):
                raise NonFiniteLossError(f"loss is {micro_loss} at step {self.step}; stopping "
                                         "(lower --lr, or use --dtype float64); the last good "
                                         "checkpoint is kept")
            model.loss_backward(cache, dloss=1.0 / c.accum_steps)
            loss += micro_loss / c.accum_steps
            self.tokens_seen += int(x.size)
        for hook in self.hooks:
            if hasattr(hook, "extra_loss"):
                loss += hook.extra_loss(self)
        grad_norm = clip_grad_norm(self.model.parameters(trainable_only=True), c.grad_clip) \
            if c.grad_clip > 0 else float("nan")
        lr = self.lr_at(self.step)
        self.optimizer.step(lr)
        for hook in self.hooks:
            if hasattr(hook, "after_step"):
                hook.after_step(self)
        model.zero_grad()
        backend.synchronize(self.xp)
        seconds = time.perf_counter() - start
        self.step += 1
        tokens = c.accum_steps * c.batch_size * self.data.context
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / seconds, "seconds": seconds}

    def evaluate(self, data=None, split: str = "val") -> float:
        """Mean loss over ``eval_batches`` fixed batches (dropout off)."""
        data = self.data if data is None else data
        self.model.eval()
        losses = []
        for x, y in data.eval_batches(split, self.config.batch_size, self.config.eval_batches):
            loss, _ = self.model.loss(backend.asarray(x, xp=self.xp), backend.asarray(y, xp=self.xp))
            losses.append(loss)
        self.model.train()
        return float(np.mean(losses))

    def fit(self, on_step=None, progress: bool = True, desc: str = "train") -> list[dict]:
        """Run until ``config.steps``; ``on_step(trainer, record)`` after each (checkpoints)."""
        from tqdm import tqdm
        history = []
        bar = tqdm(total=self.config.steps, initial=self.step, desc=desc, disable=not progress,
                   dynamic_ncols=True, leave=False)
        while self.step < self.config.steps:
            record = self.train_step()
            if self.config.eval_interval and self.step % self.config.eval_interval == 0:
                record["val_loss"] = self.evaluate()
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if on_step is not None:
                on_step(self, record)
        bar.close()
        return history

    # --- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "rng": self.rng.bit_generator.state, "optimizer": self.optimizer.state_dict(),
                "dropout_rngs": _dropout_states(self.model),
                "hooks": [h.state_dict() if hasattr(h, "state_dict") else None
                          for h in self.hooks]}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.rng.bit_generator.state = state["rng"]
        self.optimizer.load_state_dict(state["optimizer"])
        _set_dropout_states(self.model, state.get("dropout_rngs", {}))
        for hook, hook_state in zip(self.hooks, state.get("hooks") or []):
            if hook_state is not None:
                hook.load_state_dict(hook_state)


def _dropout_states(model) -> dict:
    from .adapters import adapted_modules
    return {name: m._dropout_rng.state for name, m in adapted_modules(model)
            if m._dropout_rng.state is not None}


def _set_dropout_states(model, states: dict) -> None:
    from .adapters import adapted_modules
    for name, m in adapted_modules(model):
        if name in states:
            m._dropout_rng.state = states[name]
