"""AdamW with ``torch.optim.AdamW`` semantics, global-norm clipping, and the LR schedule.

Per trainable parameter p with gradient g, at its own step t (torch keeps a step per tensor,
so a parameter added later starts its bias correction at t = 1):

    p ← p (1 - lr·wd)                                   decoupled weight decay
    m ← m + (g - m)(1 - β1)                             torch's lerp form of β1 m + (1-β1) g
    v ← β2 v + (1 - β2) g²
    p ← p - (lr / (1 - β1ᵗ)) · m / (√v / √(1 - β2ᵗ) + eps)

Frozen parameters (``trainable`` False) and parameters without a gradient get no state and
no update, as in torch where ``p.grad is None`` is skipped.
"""
from __future__ import annotations

import math

from .. import backend


class AdamW:
    def __init__(self, named_params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.params: dict = {}      # name -> Parameter, in insertion order
        self.state: dict = {}       # name -> {"step": int, "exp_avg": array, "exp_avg_sq": array}
        self.step_count = 0         # optimizer steps taken (the schedule's clock)
        self.lr_scale: dict = {}    # name -> multiplier of the step's lr (parameter groups)
        for name, p in named_params:
            self.add_param(name, p)

    def add_param(self, name: str, p) -> None:
        """Register a parameter (e.g. a newly activated rank); its state starts fresh."""
        if name in self.params and self.params[name] is not p:
            raise ValueError(f"a different parameter named {name!r} is already registered")
        self.params[name] = p
        self.state.pop(name, None)

    def remove_param(self, name: str) -> None:
        self.params.pop(name, None)
        self.state.pop(name, None)
        self.lr_scale.pop(name, None)

    def set_lr_scale(self, p, factor: float) -> None:
        """``p`` learns at ``factor`` × the step's lr (and decays with it, as a torch param
        group's lr does): LoRA+'s B group (docs/variants.md#loraplus)."""
        name = self.name_of(p)
        if name is None:
            raise ValueError("set_lr_scale: the parameter is not registered")
        if not float(factor) > 0.0:
            raise ValueError(f"factor must be > 0, got {factor!r}")
        self.lr_scale[name] = float(factor)

    # --- what step hooks need, by parameter (never by name or id) ------------------------------
    def name_of(self, p) -> str | None:
        """The name ``p`` (the Parameter object itself) is registered under, or None."""
        return next((name for name, q in self.params.items() if q is p), None)

    def reset_state(self, p) -> bool:
        """Drop ``p``'s moments and step count: its next update starts fresh (bias correction
        from t = 1), as a new parameter's would. Returns False when ``p`` is not registered."""
        name = self.name_of(p)
        if name is not None:
            self.state.pop(name, None)
        return name is not None

    def moments(self, p) -> tuple | None:
        """``(exp_avg, exp_avg_sq)`` of ``p`` (the live arrays: in-place edits take effect), or
        None before ``p``'s first update or when it is not registered."""
        st = self.state.get(self.name_of(p))
        return None if st is None else (st["exp_avg"], st["exp_avg_sq"])

    def step_of(self, p) -> int:
        """How many updates ``p`` has had since its state (re)started; 0 without state."""
        st = self.state.get(self.name_of(p))
        return 0 if st is None else int(st["step"])

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.zero_grad()

    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else float(lr)
        beta1, beta2 = self.betas
        self.step_count += 1
        for name, p in self.params.items():
            if not p.trainable or p.grad is None:
                continue
            st = self.state.get(name)
            if st is None:
                xp = backend.get_namespace(p.data)
                st = self.state[name] = {"step": 0, "exp_avg": xp.zeros_like(p.data),
                                         "exp_avg_sq": xp.zeros_like(p.data)}
            st["step"] += 1
            t = st["step"]
            g, m, v = p.grad, st["exp_avg"], st["exp_avg_sq"]
            lr_p = lr * self.lr_scale.get(name, 1.0)
            if self.weight_decay:
                p.data *= 1.0 - lr_p * self.weight_decay
            m += (g - m) * (1.0 - beta1)
            v *= beta2
            v += (g * g) * (1.0 - beta2)
            step_size = lr_p / (1.0 - beta1 ** t)
            denom = backend.get_namespace(v).sqrt(v)
            denom /= math.sqrt(1.0 - beta2 ** t)
            denom += self.eps
            upd = m / denom
            upd *= step_size
            p.data -= upd

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Hyper-parameters, step counts and host (NumPy) copies of the moments."""
        return {
            "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
            "weight_decay": self.weight_decay, "step_count": self.step_count,
            "state": {name: {"step": st["step"],
                             "exp_avg": backend.to_numpy(st["exp_avg"]).copy(),
                             "exp_avg_sq": backend.to_numpy(st["exp_avg_sq"]).copy()}
                      for name, st in self.state.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore a ``state_dict()``; moments move onto each parameter's backend and dtype."""
        unknown = sorted(set(sd["state"]) - set(self.params))
        if unknown:
            raise ValueError(f"optimizer state for unknown parameters: {unknown}")
        self.lr = float(sd["lr"])
        self.betas = (float(sd["betas"][0]), float(sd["betas"][1]))
        self.eps = float(sd["eps"])
        self.weight_decay = float(sd["weight_decay"])
        self.step_count = int(sd["step_count"])
        self.state = {}
        for name, st in sd["state"].items():
            p = self.params[name]
            xp = backend.get_namespace(p.data)
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(st[key].shape) != tuple(p.shape):
                    raise ValueError(f"{name}.{key} has shape {tuple(st[key].shape)}, "
                                     f"parameter has {tuple(p.shape)}")
                moments[key] = backend.asarray(st[key], dtype=p.dtype, xp=xp)
            self.state[name] = {"step": int(st["step"]), **moments}


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients by ``max_norm / (‖g‖ + 1e-6)`` when that is < 1, as torch's
    ``clip_grad_norm_``; returns the global norm before clipping. Accepts Parameters or
    ``(name, Parameter)`` pairs; frozen and gradient-less ones are ignored."""
    grads = []
    for item in params:
        p = item[1] if isinstance(item, tuple) else item
        if p.trainable and p.grad is not None:
            grads.append(p.grad)
    if not grads:
        return 0.0
    xp = backend.get_namespace(*grads)
    sq = None
    for g in grads:
        flat = g.reshape(-1)
        s = xp.vdot(flat, flat)          # 0-d, stays on the device until the one float() below
        sq = s if sq is None else sq + s
    total = math.sqrt(float(sq))
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps (step 0 gets base_lr/warmup), then a cosine from
    ``base_lr`` down to ``min_lr`` reached at ``total``; constant ``min_lr`` afterwards."""
    if warmup < 0 or total < 1:
        raise ValueError(f"need warmup >= 0 and total >= 1, got warmup={warmup}, total={total}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return float(base_lr)
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def loraplus_scales(named_params, ratio: float, lr: float, embedding_names=(),
                    lr_embedding: float = 1e-6) -> dict:
    """LoRA+'s parameter groups (Hayou et al. 2402.12354, PEFT's ``create_loraplus_optimizer``):
    ``{name: lr multiplier}``. As PEFT: ``lora_B`` factors and every 1-D parameter (biases,
    magnitudes, gates, VeRA's λ) learn at ``ratio`` × lr; the trainable parameters of
    embedding layers (``embedding_names``) at ``lr_embedding`` (absolute, so ×lr_embedding/lr);
    the rest (A factors) at lr. docs/variants.md#loraplus"""
    if not float(ratio) > 0.0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {ratio!r}")
    embedding_names = set(embedding_names)
    scales = {}
    for name, p in named_params:
        if name in embedding_names:
            scales[name] = float(lr_embedding) / float(lr)
        elif "lora_B" in name or len(p.shape) == 1:
            scales[name] = float(ratio)
    return scales
