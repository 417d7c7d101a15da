"""Learning-rate schedules: a multiplier of the base lr for each 0-based optimizer step
(docs/training.md#schedules).

The warm-up ones are Hugging Face's ``get_*_schedule_with_warmup`` lambdas: step t < W runs at
t / W (step 0 at lr 0), then

    linear     (T - t) / (T - W), floored at 0
    cosine     ½ (1 + cos(π (t - W) / (T - W))), floored at 0
    constant   1

"lowrank_cosine" is lowrank's earlier rule (step t < W at (t + 1) / W, then a cosine from lr down
to ``min_lr`` at T, ``min_lr`` afterwards). A variant whose official code schedules otherwise
(ReLoRA's jagged cosine, IncreLoRA's per-group warm-ups, RoSA's restart) reshapes this through
its step hook's ``lr_at``.
"""
from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant", "lowrank_cosine")


def check_schedule(name) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


def warmup_factor(step: int, warmup: int, total: int, kind: str = "linear") -> float:
    """Hugging Face's multiplier at 0-based ``step`` (``kind``: linear, cosine, constant)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lowrank_cosine(step: int, base_lr: float, warmup: int, total: int,
                   min_lr: float = 0.0) -> float:
    """lowrank's earlier schedule (an lr, not a factor): warm-up with step 0 at base_lr/warmup,
    then a cosine from ``base_lr`` down to ``min_lr`` reached at ``total``."""
    if warmup < 0 or total < 1:
        raise ValueError(f"need warmup >= 0 and total >= 1, got warmup={warmup}, total={total}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return float(base_lr)
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def scheduled_lr(name: str, step: int, base_lr: float, warmup: int, total: int,
                 min_lr: float = 0.0) -> float:
    """The lr of 0-based ``step`` under schedule ``name`` (``min_lr``: lowrank_cosine only)."""
    check_schedule(name)
    if name == "lowrank_cosine":
        return lowrank_cosine(step, base_lr, warmup, total, min_lr)
    return base_lr * warmup_factor(step, warmup, total, name)


class Schedule:
    """One schedule bound to a run's numbers: ``schedule.lr_at(step)``; ``restarted(k)``
    gives the same schedule begun again at step k over the steps left (RoSA's second run)."""

    def __init__(self, name: str, base_lr: float, warmup: int, total: int,
                 min_lr: float = 0.0, start: int = 0):
        check_schedule(name)
        self.name, self.base_lr, self.warmup = name, float(base_lr), int(warmup)
        self.total, self.min_lr, self.start = int(total), float(min_lr), int(start)

    def lr_at(self, step: int) -> float:
        return scheduled_lr(self.name, step - self.start, self.base_lr, self.warmup,
                            max(1, self.total - self.start), self.min_lr)

    def restarted(self, at: int) -> "Schedule":
        return Schedule(self.name, self.base_lr, self.warmup, self.total, self.min_lr, at)


__all__ = ["SCHEDULES", "Schedule", "check_schedule", "lowrank_cosine", "scheduled_lr",
           "warmup_factor"]
