"""SoRA (Ding et al., 2311.11696) — a LoRA whose rank is gated and pruned — docs/variants.md#sora.

    u = x_d Aᵀ (N, r),   v = u ⊙ g,   y = x W0ᵀ + b0 + s · v Bᵀ,   s = α/r

A is kaiming-uniform and B = 0 as in LoRA; the gate ``g (r,) ~ N(0, 1)`` (the official code's
``torch.randn(1, r)``). Backward, with G = dL/dy:
    dB = s Gᵀ v,   dv = s G B,   dg = Σ_rows(dv ⊙ u),   du = dv ⊙ g,   dA = duᵀ x_d,
    dx = G W0 + (du A) ⊙ mask         (without dropout: dx = G (W0 + s B diag(g) A))

The gate is not stepped by AdamW: the Trainer hook (``SoraLinear.step_hook``) claims it and,
after the AdamW step, gives it its own step followed by a threshold (``threshold``):

    "official" (default): the three in-place masks of the official ``SparseAdamW.step``,
        g[g > ξ] −= ξ;  g[g < −ξ] += ξ;  g[|g| < ξ] = 0
        so every ξ < |g| < 2ξ is first shrunk below ξ and then zeroed: |g| < 2ξ → 0 (the two
        boundary values ±ξ, ±2ξ end at ±ξ), the rest shrink by ξ
    "soft": the proximal step of ξ‖g‖₁, g ← sign(g) · max(|g| − ξ, 0)

and, as the official trainer's ``compute_loss`` does, the loss gets ``loss_lambda · Σ|g| / #g``
over all gates of the model (official ``--sparse_lambda``; its gradient
``loss_lambda · sign(g) / #g`` goes into the gates' .grad before clipping; 0 turns it off).

Gate optimizer (``gate_optimizer``): "adam" is the official code's ``SparseAdamW`` (HF AdamW:
betas (0.9, 0.999), eps 1e-6 added to √v before the bias correction, no weight decay), the
threshold ξ itself; "sgd" is the paper's proximal gradient step, threshold η·ξ:
``g ← T_{ηξ}(g − η ∇g)``.

ξ schedule (the official ``SparseAdamW._build_lambda_list``, made per step): with f the ramp
fraction ``min(1, step / (T − 1))``, T = ``lambda_steps`` (0: the whole run):
    constant:   ξ = sparse_lambda
    linear:     ξ = ξ0 + f (ξ1 − ξ0)                  (np.linspace(ξ0, ξ1, T)[step])
    log_linear: ξ = log(e^ξ0 + f (e^ξ1 − e^ξ0))       (np.log(np.linspace(e^ξ0, e^ξ1, T)))
with ξ0 = ``sparse_lambda`` (official ``--sparse_lambda_2``), ξ1 = ``max_lambda``. The official
code moves ξ once per multi-epoch stage (``lambda_num`` stages); here it moves every step.

``prune()`` returns the plain LoRA of rank r' = #{g ≠ 0}: ``A' = A[keep]``,
``B' = B[:, keep] ⊙ g[keep]``, with LoRA's α' = s·r' so its scaling α'/r' is still s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import backend
from ..nn.decompose import check_rank
from ..nn.hooks import StepHook
from ..nn.module import Parameter
from ..nn.schedules import scheduled_lr
from ._lowrank import LowRankMap, LowRankParts
from .base import AdaptedLinear, AdapterConfig, Report, config, register
from .inject import _set_child
from .lora import LoraLinear, lora_factors

LAMBDA_SCHEDULES = ("constant", "linear", "log_linear")
GATE_OPTIMIZERS = ("adam", "sgd")
THRESHOLDS = ("official", "soft")
_BETAS, _EPS = (0.9, 0.999), 1e-6   # HF transformers.AdamW defaults, as SparseAdamW uses


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SoraConfig(AdapterConfig):
    sparse_lambda: float = 1e-3        # ξ (at step 0 when scheduled); official sparse_lambda_2
    lambda_schedule: str = "constant"  # one of LAMBDA_SCHEDULES
    max_lambda: float | None = None    # ξ at the end of the ramp (linear, log_linear)
    lambda_steps: int = 0              # ramp length in optimizer steps; 0: the whole run
    gate_lr: float | None = None       # None: the trainer's lr (official sparse_lr default)
    gate_optimizer: str = "adam"       # one of GATE_OPTIMIZERS
    threshold: str = "official"        # one of THRESHOLDS: the three masks, or the soft one
    loss_lambda: float = 1e-3          # L1 term in the loss, λ·mean|g|; official sparse_lambda

    def __post_init__(self):
        super().__post_init__()
        for name in ("sparse_lambda", "loss_lambda"):
            value = getattr(self, name)
            if not _number(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {self.threshold!r}")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"lambda_schedule must be one of {LAMBDA_SCHEDULES}, "
                             f"got {self.lambda_schedule!r}")
        if self.max_lambda is not None and (not _number(self.max_lambda) or self.max_lambda < 0):
            raise ValueError(f"max_lambda must be a number >= 0 or None, got {self.max_lambda!r}")
        if self.lambda_schedule != "constant" and self.max_lambda is None:
            raise ValueError(f"max_lambda must be given for lambda_schedule="
                             f"{self.lambda_schedule!r} (the value ξ ramps to)")
        if self.max_lambda is not None:
            self.max_lambda = float(self.max_lambda)
        if isinstance(self.lambda_steps, bool) or not isinstance(self.lambda_steps, int) \
                or self.lambda_steps < 0:
            raise ValueError(f"lambda_steps must be an integer >= 0, got {self.lambda_steps!r}")
        if self.gate_lr is not None and (not _number(self.gate_lr) or self.gate_lr <= 0):
            raise ValueError(f"gate_lr must be a number > 0 or None, got {self.gate_lr!r}")
        if self.gate_optimizer not in GATE_OPTIMIZERS:
            raise ValueError(f"gate_optimizer must be one of {GATE_OPTIMIZERS}, "
                             f"got {self.gate_optimizer!r}")


def lambda_at(cfg: SoraConfig, step: int, total_steps: int) -> float:
    """ξ for the proximal step after optimizer step ``step`` (0-based) of a ``total_steps`` run."""
    xi0 = cfg.sparse_lambda
    if cfg.lambda_schedule == "constant":
        return xi0
    ramp = cfg.lambda_steps or total_steps
    frac = 1.0 if ramp <= 1 else min(1.0, max(0, step) / (ramp - 1))
    xi1 = cfg.max_lambda
    if cfg.lambda_schedule == "linear":
        return xi0 + frac * (xi1 - xi0)
    # log(e^ξ0 + f (e^ξ1 − e^ξ0)) = ξ0 + log1p(f · expm1(ξ1 − ξ0)), without overflow
    return xi0 + math.log1p(frac * math.expm1(xi1 - xi0))


def soft_threshold(g, xi: float):
    """``sign(g) · max(|g| − ξ, 0)``: the proximal operator of ξ‖g‖₁."""
    xp = backend.get_namespace(g)
    return xp.sign(g) * xp.maximum(xp.abs(g) - float(xi), 0.0)


def masked_threshold(g, xi: float):
    """The official ``SparseAdamW.step`` threshold: three masks applied in sequence (each sees
    the previous one's result), so |g| < 2ξ ends at 0 and the rest shrink by ξ."""
    xp, xi = backend.get_namespace(g), float(xi)
    if xi <= 0.0:
        return g                                 # official: only when sparse_lambda > 0
    g = xp.where(g > xi, g - xi, g)
    g = xp.where(g < -xi, g + xi, g)
    return xp.where(xp.abs(g) < xi, xp.zeros_like(g), g)


def threshold(g, xi: float, kind: str):
    return masked_threshold(g, xi) if kind == "official" else soft_threshold(g, xi)


@register("sora", SoraConfig)
class SoraLinear(LowRankMap, AdaptedLinear):
    official_schedule = "linear"   # the official runs: Hugging Face Trainer, linear warm-up
    official_adamw = "hf"          # and decay, transformers.AdamW (docs/variants.md#sora)

    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        self.scaling = cfg.alpha / cfg.r
        A, B, _ = lora_factors(self.weight.data, cfg.r, self.scaling, "kaiming", rng)
        self.lora_A = Parameter(A)        # (r, n)
        self.lora_B = Parameter(B)        # (m, r)
        self.lora_gate = Parameter(backend.host_normal(rng, (cfg.r,), 1.0, self.dtype.name,
                                                       self.xp))   # (r,)

    # --- the map: the product with gate g (docs/variants.md#sora, _lowrank.py) ---------------
    def lowrank_parts(self) -> LowRankParts:
        return LowRankParts(self.lora_A.data, self.lora_B, self.scaling, self.lora_gate.data,
                            need_dP=self.lora_A.trainable, need_dg=self.lora_gate.trainable)

    def accumulate_lowrank(self, dA, dg) -> None:
        if dg is not None:
            self.lora_gate.accumulate(dg)                                # (r,)
        if dA is not None:
            self.lora_A.accumulate(dA)                                   # (r, n)

    # --- rank ----------------------------------------------------------------------------
    def kept_rank(self) -> int:
        """``#{g ≠ 0}``: the rank the proximal steps have left."""
        xp = self.xp
        return int(xp.count_nonzero(self.lora_gate.data))

    def prune(self) -> LoraLinear:
        """The plain LoRA of rank ``#{g ≠ 0}`` with the same outputs (same base, bias, dropout).

        ``A' = A[keep]``, ``B' = B[:, keep] ⊙ g[keep]``; LoRA's scaling α'/r' must stay s, so
        α' = s·r'. All gates zero: a rank-1 LoRA with B' = 0 (LoRA needs r >= 1).
        """
        cfg, xp = self.config, self.xp
        keep = xp.nonzero(self.lora_gate.data)[0]                        # (r',)
        rank = int(keep.shape[0])
        r_new = max(rank, 1)
        base = self.unmerged_weight() if self.merged else self.weight.data
        bias = None if self.bias is None else self.bias.data
        lora_cfg = config("lora", r=r_new, alpha=self.scaling * r_new, dropout=cfg.dropout,
                          bias=cfg.bias, init="kaiming")
        lora = LoraLinear(base, bias, lora_cfg)
        lora.scaling = self.scaling       # exactly s (α'/r' may differ from s by an ulp)
        if rank:
            lora.lora_A.data = self.lora_A.data[keep].copy()                           # (r', n)
            lora.lora_B.data = self.lora_B.data[:, keep] * self.lora_gate.data[keep]   # (m, r')
        else:
            lora.lora_A.data = self.lora_A.data[:1].copy()                             # (1, n)
            lora.lora_B.data = xp.zeros((self.out_features, 1), dtype=self.dtype)
        lora.lora_A.trainable = self.lora_A.trainable
        lora.lora_B.trainable = self.lora_B.trainable
        if self.bias is not None:
            lora.bias.trainable = self.bias.trainable
        lora.set_dropout_rng_state(self.dropout_rng_state())
        lora.train(self.training)
        if self.merged:
            lora.merge()
        return lora

    # --- training-loop integration ------------------------------------------------------
    @classmethod
    def step_hook(cls, model):
        return SoraHook(model)

    @classmethod
    def report(cls, model, out) -> Report:
        layers = cls.layers_of(model)
        return Report([f"sora {name}: rank {m.kept_rank()} of {m.config.r} kept (g != 0)"
                       for name, m in layers],
                      {name: {"kept_rank": m.kept_rank(), "r": int(m.config.r)}
                       for name, m in layers})

    def adapter_metadata(self) -> dict:
        return {"kept_rank": self.kept_rank()}


def prune_sora(model) -> dict:
    """Replace every SoRA module of ``model`` by its pruned LoRA; returns {name: kept rank}."""
    kept = {}
    for name, m in SoraLinear.layers_of(model):
        kept[name] = m.kept_rank()
        _set_child(model, name, m.prune())
    return kept


class SoraHook(StepHook):
    """The gate's own optimizer step + the proximal step, after each AdamW step (one per model)."""

    def __init__(self, model):
        self.layers = SoraLinear.layers_of(model)
        self.state: dict = {}    # module name -> {"step", "exp_avg", "exp_avg_sq"} (adam)
        self.last_lambda = None

    def owns(self, name, p) -> bool:
        return any(p is m.lora_gate for _, m in self.layers)

    def extra_loss(self, trainer) -> float:
        """The official trainer's ``loss_lambda · Σ|g| / #g`` over all gates (``#g`` counts
        every gate entry of the model); its gradient ``loss_lambda · sign(g) / #g``."""
        lam = self.layers[0][1].config.loss_lambda if self.layers else 0.0
        if lam == 0.0:
            return 0.0
        count = sum(int(m.lora_gate.data.size) for _, m in self.layers)
        total = 0.0
        for _, m in self.layers:
            g = m.lora_gate
            xp = backend.get_namespace(g.data)
            total += float(xp.abs(g.data).sum())
            if g.trainable:
                g.accumulate(xp.sign(g.data) * (lam / count))             # (r,)
        return lam * total / count

    def after_step(self, trainer) -> None:
        c, step = trainer.config, trainer.step      # step: 0-based index of this step
        for name, m in self.layers:
            g, cfg = m.lora_gate, m.config
            if not g.trainable or g.grad is None:
                continue
            lr = self.gate_lr(trainer, cfg)
            xi = lambda_at(cfg, step, c.steps)
            if cfg.gate_optimizer == "sgd":
                g.data -= lr * g.grad
                xi *= lr                          # the paper's proximal step: T_{ηξ}
            else:
                self._adam(name, g, lr)
            g.data = threshold(g.data, xi, cfg.threshold)
            self.last_lambda = xi

    @staticmethod
    def gate_lr(trainer, cfg: SoraConfig) -> float:
        """The run's learning-rate schedule (warm-up and decay, any hook's reshaping), rescaled
        to start from ``gate_lr`` when one is given (official: ``sparse_lr``, own scheduler
        of the same warm-up + decay shape)."""
        c = trainer.config
        lr = trainer.lr_at(trainer.step)
        if cfg.gate_lr is None:
            return lr
        if c.lr > 0:
            return lr * (cfg.gate_lr / c.lr)
        return scheduled_lr(trainer.schedule_name, trainer.step, cfg.gate_lr, c.warmup, c.steps)

    def _adam(self, name, g, lr: float) -> None:
        xp = backend.get_namespace(g.data)
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"step": 0, "exp_avg": xp.zeros_like(g.data),
                                     "exp_avg_sq": xp.zeros_like(g.data)}
        st["step"] += 1
        t, (b1, b2) = st["step"], _BETAS
        st["exp_avg"] *= b1
        st["exp_avg"] += (1.0 - b1) * g.grad
        st["exp_avg_sq"] *= b2
        st["exp_avg_sq"] += (1.0 - b2) * (g.grad * g.grad)
        step_size = lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        g.data -= step_size * (st["exp_avg"] / (xp.sqrt(st["exp_avg_sq"]) + _EPS))

    def state_dict(self) -> dict:
        return {"gates": {name: {"step": st["step"],
                                 "exp_avg": backend.to_numpy(st["exp_avg"]).copy(),
                                 "exp_avg_sq": backend.to_numpy(st["exp_avg_sq"]).copy()}
                          for name, st in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        modules = dict(self.layers)
        unknown = sorted(set(state.get("gates", {})) - set(modules))
        if unknown:
            raise ValueError(f"SoRA gate state for unknown modules: {unknown}")
        self.state = {}
        for name, st in state.get("gates", {}).items():
            g = modules[name].lora_gate
            xp = backend.get_namespace(g.data)
            moments = {k: backend.asarray(st[k], dtype=g.dtype, xp=xp)
                       for k in ("exp_avg", "exp_avg_sq")}
            if any(tuple(a.shape) != tuple(g.shape) for a in moments.values()):
                raise ValueError(f"SoRA gate state for {name} does not match the gate shape "
                                 f"{tuple(g.shape)}")
            self.state[name] = {"step": int(st["step"]), **moments}
