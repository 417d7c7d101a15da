"""ReLoRA (Lialin et al., 2307.05695) — high-rank training from low-rank steps (docs/variants.md#relora).

The layer is LoRA with the kaiming init (A ~ U(-1/√n, 1/√n), B = 0, s = α/r), so forward and
backward are LoraLinear's (docs/variants.md#lora):

    y = x W0ᵀ + b0 + s · (x_d Aᵀ) Bᵀ
    dB = s Gᵀ u,   du = s G B,   dA = duᵀ x_d,   dx = G W0 + (du A) ⊙ mask,   u = x_d Aᵀ

Every ``reset_interval`` (K) completed steps ``ReLoraHook`` restarts every ReLoRA layer:

* merge: ``W0 ← W0 + s·BA``, the frozen base absorbs the cycle (formed exactly as the forward's
  effective weight, so the output before and after the restart is bit-identical);
* re-init: A ~ kaiming from the layer's own host stream (reproducible, resumable), B = 0;
* optimizer: the AdamW ``exp_avg`` and ``exp_avg_sq`` of every A and B are pruned as in the
  official code (``training_utils.random_pruning`` / ``magnitude_pruning``), each moment on its
  own: ``random`` zeroes each entry with probability ``reset_ratio`` (keep ``u > ratio``,
  u ~ U(0, 1) from the host stream); ``magnitude`` zeroes the entries with ``|v| <= q``, q the
  ``reset_ratio`` quantile of |v| (linear interpolation, torch.quantile's), so below 1.0 the
  largest entry survives (31 of 32 zeroed at 0.999). The step counters are kept (official).
  ``reset_ratio`` 0.999 is the paper's default; 1.0 zeroes everything, 0.0 nothing;
* learning rate, "jagged cosine" (``schedule``). "official" (default), the current official
  ``_get_cosine_schedule_with_multiple_warmups_lambda`` times the trainer's lr, with
  T = steps, W0 = the trainer's warm-up, K = reset_interval, W = restart_warmup, ρ =
  ``min_lr_ratio`` (None: the trainer's min_lr / lr), cos(p) = ρ + (1-ρ)·½(1 + cos πp):
      t < W0:                       t / W0                       (step 0 runs at lr 0)
      t >= K and i = t mod K < W:   i / W · cos((⌊t/K⌋·K + W - W0) / (T - W0))
      otherwise:                    cos((t - W0) / (T - W0))
  so each restart warms up to the cosine's value at the end of its warm-up (no jump), and
  the first cycle has no restart warm-up. "official_2023" is the code of May 2023 (the
  restart warm-up also in the first cycle, towards the cosine at the cycle's start);
  "ramp" (lowrank's earliest rule): the trainer's schedule times ``(i+1)/W`` for the i-th
  step after a restart (no step spent at lr 0).
* when: with "official" the layers restart after 0-based step t = K, 2K, … (the official loop
  merges at ``update_step % K == 1``, after the lr-0 step that still ran on the old LoRA, so
  the pruned moments hold that step's gradient); the other schedules restart after K, 2K, …
  completed steps (the lr-0 step then runs on the fresh LoRA). As the official code, K = 1
  never restarts under "official".
* ``trainable_scaling`` (official ``--trainable_scaling``): the scale is ``tanh(θ)`` of a
  trainable ``lora_scaling (1,)``, θ = 1 at init (α/r unused), and a restart sets θ = 0 as
  the official ``merge_and_reinit`` does (``nn.init.zeros_(self.scaling)``). It runs as the
  low-rank product's gate: g = tanh(θ)·1_r, c = 1, so dθ = (1 - tanh²θ) Σ_q dg_q.

Under the legacy schedules no restart follows the last step, so ``delta_weight()`` (s·BA of the current cycle; the merged
history lives in W0) stays the final cycle's. After k restarts ``rank(W - W_init)`` can reach
(k+1)·r. The hook keeps ``W - W_init`` of the first ReLoRA module (float64) for ``report``.

Saving: W0 has changed, so the adapter is only complete with the base weight in the file.
``saves_base_weight()`` (True) asks lowrank.formats.checkpoint to store it (``<module>.base_layer.weight``);
``adapter_metadata`` records the restarts and a fingerprint of W0, and loading an adapter that
had restarts into a base whose W0 is not the saved one raises instead of silently dropping the
merged cycles.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from .. import backend
from ..nn.decompose import check_rank
from ..nn.hooks import StepHook
from ..nn.module import Parameter
from ._lowrank import LowRankParts
from .base import AdapterConfig, Report, register
from .lora import LoraLinear, lora_factors

RESETS = ("random", "magnitude")
SCHEDULES = ("official", "official_2023", "ramp")
RANK_RTOL = 1e-8     # report: singular values > 1e-8 · σ_max count towards rank(W - W_init)


@dataclass
class ReLoraConfig(AdapterConfig):
    reset_interval: int = 50        # K: steps per cycle
    restart_warmup: int = 5         # steps of the LR ramp after each restart
    optimizer_reset: str = "random"
    reset_ratio: float = 0.999      # fraction of the adapter's AdamW moments zeroed
    schedule: str = "official"      # one of SCHEDULES: the jagged learning rate
    min_lr_ratio: float | None = None   # official floor ρ; None: the trainer's min_lr / lr
    trainable_scaling: bool = False     # scale tanh(θ), θ trainable (official option)

    def __post_init__(self):
        super().__post_init__()
        k = self.reset_interval
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"reset_interval must be an integer >= 1, got {k!r}")
        w = self.restart_warmup
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= k:
            raise ValueError(f"restart_warmup must be an integer in 0..reset_interval = 0..{k}, "
                             f"got {w!r}")
        if self.optimizer_reset not in RESETS:
            raise ValueError(f"optimizer_reset must be one of {RESETS}, "
                             f"got {self.optimizer_reset!r}")
        if not 0.0 <= float(self.reset_ratio) <= 1.0:
            raise ValueError(f"reset_ratio must be in [0, 1], got {self.reset_ratio!r}")
        self.reset_ratio = float(self.reset_ratio)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        rho = self.min_lr_ratio
        if rho is not None and (isinstance(rho, bool) or not isinstance(rho, (int, float))
                                or not 0.0 < rho <= 1.0):
            raise ValueError(f"min_lr_ratio must be in (0, 1] or None, got {rho!r}")
        if not isinstance(self.trainable_scaling, bool):
            raise ValueError(f"trainable_scaling must be a bool, got {self.trainable_scaling!r}")


def restart_lr_factor(step: int, reset_interval: int, restart_warmup: int) -> float:
    """The learning-rate multiplier at step index ``step`` (0-based): the ramp after a restart."""
    if step < reset_interval or restart_warmup == 0:
        return 1.0
    i = step % reset_interval
    return (i + 1) / restart_warmup if i < restart_warmup else 1.0


def official_lr_lambda(step: int, total: int, first_warmup: int, restart_warmup: int,
                       reset_interval: int, min_lr_ratio: float) -> float:
    """The current official jagged-cosine multiplier of 0-based ``step``
    (docs/variants.md#relora)."""
    if step < first_warmup:
        return step / max(1, first_warmup)
    span = max(1, total - first_warmup)
    i, cycle = step % reset_interval, step // reset_interval
    if i < restart_warmup and step >= reset_interval:
        end = (cycle * reset_interval + restart_warmup - first_warmup) / span
        top = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * end))
        return i / max(1, restart_warmup) * top
    progress = (step - first_warmup) / span
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def official_2023_lr_lambda(step: int, total: int, first_warmup: int, restart_warmup: int,
                            reset_interval: int, min_lr_ratio: float) -> float:
    """The May 2023 official multiplier ("official_2023"): restart warm-ups in every cycle,
    towards the cosine at the cycle's start."""
    if step < first_warmup:
        return step / max(1, first_warmup)
    span = max(1, total - first_warmup)
    i, cycle = step % reset_interval, step // reset_interval
    if i < restart_warmup:
        top = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * cycle * reset_interval / span))
        return i / max(1, restart_warmup) * top
    progress = (step - first_warmup) / span
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def prune_moment(v, ratio: float, method: str, rng) -> None:
    """Zero (in place) a ``ratio`` fraction of ``v`` as the official optimizer reset does."""
    if ratio <= 0.0 or v.size == 0:
        return
    xp = backend.get_namespace(v)
    if method == "random":
        u = backend.host_uniform(rng, v.shape, 0.0, 1.0, "float64", xp)
        v *= u > ratio
    else:
        mag = xp.abs(v)
        v *= mag > xp.quantile(mag.reshape(-1), ratio)


def _fingerprint(W) -> str:
    """Hash of W0 as float32 bytes: the same for a float64 load of a float32 base."""
    return hashlib.sha256(backend.to_numpy(W.astype("float32")).tobytes()).hexdigest()[:16]


@register("relora", ReLoraConfig)
class ReLoraLinear(LoraLinear):
    def saves_base_weight(self) -> bool:
        return True   # W0 absorbs the merged cycles: the checkpoint must keep it

    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        self.scaling = cfg.alpha / cfg.r
        A, B, _ = lora_factors(self.weight.data, cfg.r, self.scaling, "kaiming", rng)
        self.lora_A = Parameter(A)   # (r, n), "lora_A.weight"
        self.lora_B = Parameter(B)   # (m, r), "lora_B.weight"
        if cfg.trainable_scaling:    # θ (1,), official torch.tensor([1.])
            self.lora_scaling = Parameter(self.xp.ones((1,), dtype=self.dtype))
        self.restarts = 0
        self.history = None          # W - W_init minus the current cycle (float64), if tracked

    # --- trainable scaling: the product's gate g = tanh(θ)·1_r, c = 1 ------------------------
    def lowrank_parts(self):
        if not self.config.trainable_scaling:
            return super().lowrank_parts()
        xp, theta = self.xp, self.lora_scaling
        gate = xp.broadcast_to(xp.tanh(theta.data), (self.config.r,))     # (r,)
        return LowRankParts(self.lora_A.data, self.lora_B, 1.0, gate,
                            need_dP=self.lora_A.trainable, need_dg=theta.trainable)

    def accumulate_lowrank(self, dA, dg) -> None:
        if dg is not None:    # dθ = (1 - tanh²θ) Σ_q dg_q
            t = self.xp.tanh(self.lora_scaling.data)                     # (1,)
            self.lora_scaling.accumulate((1.0 - t * t) * dg.sum())
        if dA is not None:
            self.lora_A.accumulate(dA)                                   # (r, n)

    def track_history(self) -> None:
        if self.history is None:
            self.history = self.xp.zeros(self.weight.shape, dtype="float64")   # (m, n)

    def restart(self) -> None:
        """Merge s·BA into W0, re-draw A (kaiming), B = 0; the output is unchanged."""
        if self.merged:
            raise RuntimeError("restart() on a merged adapter: unmerge() first")
        W = self.effective_weight()                                      # (m, n) = W0 + sBA
        if self.history is not None:
            self.history += self.delta_weight().astype("float64")        # (m, n)
        self.weight.data = W
        A, B, _ = lora_factors(W, self.config.r, self.scaling, "kaiming", self._host_rng)
        self.lora_A.data, self.lora_B.data = A, B
        if self.config.trainable_scaling:   # official merge_and_reinit: zeros_(scaling)
            self.lora_scaling.data = self.xp.zeros((1,), dtype=self.dtype)
        self.restarts += 1

    def weight_change(self):
        """``W - W_init`` (float64), from the tracked history; None when not tracked."""
        if self.history is None:
            return None
        return self.history + self.delta_weight().astype("float64")     # (m, n)

    # --- save / load (used by lowrank.formats.checkpoint) --------------------------------------------
    def adapter_metadata(self) -> dict:
        return {"restarts": self.restarts, "base_fingerprint": _fingerprint(self.weight.data)}

    def load_adapter_metadata(self, extra: dict) -> None:
        restarts = int((extra or {}).get("restarts", 0))
        saved = (extra or {}).get("base_fingerprint")
        if restarts and saved is not None and saved != _fingerprint(self.weight.data):
            raise ValueError(
                f"this ReLoRA adapter was saved after {restarts} restarts, whose merged cycles "
                "live in the base weight W0, but the W0 here is not the saved one (the file "
                "lacks base_layer.weight, or this is another base model)")
        self.restarts = restarts

    # --- training and reporting ------------------------------------------------------------
    @classmethod
    def step_hook(cls, model):
        return ReLoraHook(model)

    @classmethod
    def report(cls, model, out) -> Report:
        layers = cls.layers_of(model)
        if not layers:
            return Report()
        name, m = next(((n, m) for n, m in layers if m.history is not None), layers[0])
        D = m.weight_change()
        D = m.delta_weight() if D is None else D
        S = backend.svd(D)[1]                                            # (min(m, n),)
        top = float(S[0]) if S.size else 0.0
        rank = int((S > RANK_RTOL * top).sum()) if top > 0.0 else 0
        cfg = m.config
        return Report([f"ReLoRA: {m.restarts} restarts (every {cfg.reset_interval} steps, "
                       f"{cfg.optimizer_reset} moment reset {cfg.reset_ratio}); rank(W - W_init)"
                       f" of {name}: {rank} (r = {cfg.r}, σ > {RANK_RTOL:g}·σ_max)"],
                      {n: {"restarts": layer.restarts} for n, layer in layers})


class ReLoraHook(StepHook):
    """Restarts, moment pruning and the jagged learning rate of a model's ReLoRA layers."""

    def __init__(self, model):
        self.layers = ReLoraLinear.layers_of(model)
        if not self.layers:
            raise ValueError("the model holds no ReLoRA layers")
        self.config = self.layers[0][1].config
        self.layers[0][1].track_history()   # the report's module

    def lr_at(self, trainer, step: int, lr: float) -> float:
        cfg = self.config
        if cfg.schedule == "ramp":
            return lr * restart_lr_factor(step, cfg.reset_interval, cfg.restart_warmup)
        c = trainer.config
        rho = cfg.min_lr_ratio if cfg.min_lr_ratio is not None else \
            (c.min_lr / c.lr if c.lr > 0 else 1.0)
        rule = official_lr_lambda if cfg.schedule == "official" else official_2023_lr_lambda
        return c.lr * rule(step, c.steps, c.warmup, cfg.restart_warmup, cfg.reset_interval, rho)

    def restarts_after(self, done: int, total: int) -> bool:
        """Whether the layers restart once ``done`` steps have completed."""
        K = self.config.reset_interval
        if self.config.schedule == "official":   # official: update_step % K == 1, the last
            return done > K and done % K == 1     # step included (a run resumed past it too)
        return done % K == 0 and done < total     # delta_weight() keeps the last cycle

    def after_step(self, trainer) -> None:
        done = trainer.step + 1    # trainer.step counts completed steps before this one
        if self.restarts_after(done, trainer.config.steps):
            self.restart(trainer.optimizer)

    def restart(self, optimizer=None) -> None:
        """Restart every layer now; with an optimizer, prune the adapter's moments."""
        for _, m in self.layers:
            m.restart()
        if optimizer is None:
            return
        cfg = self.config
        for _, m in self.layers:
            for p in (m.lora_A, m.lora_B):
                for moment in optimizer.moments(p) or ():   # exp_avg, exp_avg_sq, in place
                    prune_moment(moment, cfg.reset_ratio, cfg.optimizer_reset, m._host_rng)

    def state_dict(self) -> dict:
        probe = self.layers[0][1]
        return {"restarts": {n: m.restarts for n, m in self.layers},
                "rng": {n: m.host_rng_state() for n, m in self.layers},
                "history": backend.to_numpy(probe.history).copy()}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.layers:
            m.restarts = int(state["restarts"][name])
            m.set_host_rng_state(state["rng"][name])
        probe = self.layers[0][1]
        probe.history = backend.asarray(state["history"], dtype="float64", xp=probe.xp)


__all__ = ["ReLoraConfig", "ReLoraLinear", "ReLoraHook", "restart_lr_factor",
           "official_lr_lambda", "official_2023_lr_lambda", "prune_moment"]
