"""AdaLoRA's rank allocator and orthogonality regulariser (docs/variants.md#adalora, PEFT ``RankAllocator``).

Not a variant (leading underscore: ``lowrank.adapters`` does not auto-import it); the
``adalora`` variant imports it. Every number follows PEFT 0.21 (``peft/tuners/adalora``):

Importance, per element of A, E, B, after the optimizer step (p is the *updated* value,
grad the clipped gradient that step used, regulariser included):
    I = |p ⊙ grad|,   Ī ← β1 Ī + (1-β1) I,   Ū ← β2 Ū + (1-β2) |I - Ī|   (Ī already updated)
    s = Ī ⊙ Ū,        S_k = s(E)_k + (mean_j s(A)[k, j] + mean_i s(B)[i, k])
Budget at step t (0-based, the ``global_step`` of PEFT's training-loop example), with
b0 = Σ init_r, bT = Σ target_r, T = total_step:
    t <= tinit:       b0, no mask
    t >  T - tfinal:  bT, mask with the frozen final pattern
    else:             int((b0 - bT)(1 - (t - tinit)/(T - tfinal - tinit))³ + bT),
                      mask if t % ΔT == 0
Step t (PEFT ``AdaLoraModel.update_and_allocate``):
    t <  T - tfinal:  update Ī, Ū; mask to the budget when the schedule says so
    t == T - tfinal:  no update; mask to bT (forced) -> the frozen final pattern; Ī, Ū reset
    t >  T - tfinal:  set E_k = 0 for the triplets of the frozen pattern
Mask to a budget (``mask_to_budget``): k = b0 - budget, θ = the k-th smallest S over *all*
triplets of all matrices (``torch.kthvalue``); every triplet with S <= θ gets E_k = 0. Ties at
θ are all masked, as in PEFT, so the rule depends on the values only (deterministic).
k = 0 masks nothing (PEFT's kthvalue would raise there; it happens only when target_r = init_r).

Orthogonality regulariser (PEFT ``AdaLoraModel.forward``; every A and B counts, masked
triplets included; K = number of matrices = 2 · layers):
    R = w/K Σ ‖M‖_F  (or w/K Σ ‖M‖_F² with ``squared``),  M = A Aᵀ - I or Bᵀ B - I  (r, r)
    ∂‖M‖_F/∂A = (2/‖M‖_F) M A,   ∂‖M‖_F/∂B = (2/‖M‖_F) B M   (M symmetric; 0 where M = 0)
    ∂‖M‖_F²/∂A = 4 M A,          ∂‖M‖_F²/∂B = 4 B M
"""
from __future__ import annotations

import math

from .. import backend

TRIPLET = ("lora_A", "lora_E", "lora_B")


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, delta_t: int) -> tuple[int, bool]:
    """``(budget, mask now?)`` at 0-based step ``step`` (PEFT ``budget_schedule``)."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    # same expression order as PEFT, so the int() truncation agrees bit for bit
    budget = int((init_budget - target_budget) * (coeff ** 3) + target_budget)
    return budget, step % delta_t == 0


def orth_regularizer(layers, weight: float, squared: bool = False) -> float:
    """Add ``R`` (see the module docstring) to the gradients of every trainable A and B of
    ``layers`` and return its value (a Python float)."""
    layers = list(layers)
    if weight == 0.0 or not layers:
        return 0.0
    count = 2 * len(layers)
    total = 0.0
    for layer in layers:
        for p, left in ((layer.lora_A, True), (layer.lora_B, False)):
            P = p.data
            xp = backend.get_namespace(P)
            M = P @ P.T if left else P.T @ P                              # (r, r)
            M -= xp.eye(M.shape[0], dtype=M.dtype)
            norm = math.sqrt(float((M * M).sum()))
            total += norm * norm if squared else norm
            if not p.trainable:
                continue
            coef = 4.0 if squared else (2.0 / norm if norm > 0.0 else 0.0)
            grad = M @ P if left else P @ M                               # (r, n) / (m, r)
            grad *= float(weight) * coef / count
            p.accumulate(grad)
    return float(weight) * total / count


class RankAllocator:
    """Importance EMAs, the budget schedule and the masks over a model's AdaLoRA layers.

    ``layers``: ``[(module name, AdaLoraLinear)]``. The schedule parameters come from the
    first layer's config; ``total_step`` may be resolved later (``resolve_total``).
    """

    def __init__(self, layers, config):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("RankAllocator needs at least one AdaLoRA layer")
        self.config = config
        self.init_budget = sum(layer.r for _, layer in self.layers)
        self.target_budget = sum(layer.config.target_r for _, layer in self.layers)
        self.total_step = config.total_step
        self.final_pattern = None          # {name: [bool]} once t reached T - tfinal
        self.budget = self.init_budget     # the budget of the last step
        self._final_masks = None           # device copies of final_pattern
        self.reset_importance()

    # --- schedule --------------------------------------------------------------------------
    def resolve_total(self, steps: int) -> int:
        """``total_step`` (the config's, else ``steps``: the trainer's), validated."""
        if self.total_step is None:
            c = self.config
            if not c.tinit + c.tfinal < steps:
                raise ValueError(f"tinit + tfinal must be < total_step: tinit={c.tinit}, "
                                 f"tfinal={c.tfinal}, total_step={steps} (the trainer's steps; "
                                 "set total_step or train longer)")
            self.total_step = int(steps)
        return self.total_step

    def schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, self.init_budget, self.target_budget, c.tinit, c.tfinal,
                               self.total_step, c.deltaT)

    # --- importance --------------------------------------------------------------------------
    def reset_importance(self) -> None:
        self.ema_ipt: dict = {}   # "<module>.<param>" -> Ī
        self.ema_unc: dict = {}   # "<module>.<param>" -> Ū

    def _params(self):
        for name, layer in self.layers:
            for pname in TRIPLET:
                yield f"{name}.{pname}", getattr(layer, pname)

    def update_importance(self) -> None:
        b1, b2 = float(self.config.beta1), float(self.config.beta2)
        for key, p in self._params():
            if key not in self.ema_ipt:
                xp = backend.get_namespace(p.data)
                self.ema_ipt[key] = xp.zeros_like(p.data)
                self.ema_unc[key] = xp.zeros_like(p.data)
            if p.grad is None:
                continue
            ipt = p.data * p.grad
            ipt = abs(ipt)
            ema = self.ema_ipt[key] * b1 + ipt * (1.0 - b1)
            self.ema_ipt[key] = ema
            self.ema_unc[key] = self.ema_unc[key] * b2 + abs(ipt - ema) * (1.0 - b2)

    def element_score(self, key: str):
        """``s = Ī ⊙ Ū`` of one parameter (zeros before the first update)."""
        if key not in self.ema_ipt:
            p = dict(self._params())[key]
            return backend.get_namespace(p.data).zeros_like(p.data)
        return self.ema_ipt[key] * self.ema_unc[key]

    def triplet_scores(self) -> dict:
        """``{module name: S (r,)}``."""
        scores = {}
        for name, _ in self.layers:
            s_A = self.element_score(f"{name}.lora_A").mean(axis=1)          # (r,)
            s_B = self.element_score(f"{name}.lora_B").mean(axis=0)          # (r,)
            scores[name] = self.element_score(f"{name}.lora_E") + (s_A + s_B)
        return scores

    # --- masks ---------------------------------------------------------------------------------
    def mask_to_budget(self, budget: int) -> dict:
        """Zero E for the lowest-scoring triplets so that ``budget`` remain (ties: see top)."""
        scores = self.triplet_scores()
        k = self.init_budget - int(budget)
        if k <= 0:
            keeps = {name: backend.get_namespace(s).ones(s.shape, dtype=bool)
                     for name, s in scores.items()}
        else:
            xp = backend.get_namespace(*scores.values())
            ordered = xp.sort(xp.concatenate(list(scores.values())))         # (Σr,)
            threshold = ordered[k - 1]                                        # 0-d, on device
            keeps = {name: s > threshold for name, s in scores.items()}
        pattern = {}
        for name, layer in self.layers:
            layer.lora_E.data[~keeps[name]] = 0.0
            pattern[name] = [bool(v) for v in keeps[name].tolist()]
            layer.rank_pattern = list(pattern[name])
        return pattern

    def apply_pattern(self, pattern: dict) -> None:
        """Zero E where ``pattern`` (``{name: [bool]}``) is False (device masks cached)."""
        if self._final_masks is None or self._final_masks[0] is not pattern:
            masks = {}
            for name, layer in self.layers:
                xp = backend.get_namespace(layer.lora_E.data)
                masks[name] = ~backend.asarray(pattern[name], xp=xp).astype(bool)
            self._final_masks = (pattern, masks)
        for name, layer in self.layers:
            layer.lora_E.data[self._final_masks[1][name]] = 0.0
            layer.rank_pattern = list(pattern[name])

    # --- one step ------------------------------------------------------------------------------
    def step(self, t: int):
        """After optimizer step ``t`` (0-based): ``(budget, pattern or None)``."""
        if self.total_step is None:
            raise RuntimeError("RankAllocator.step before total_step was resolved")
        final_start = self.total_step - self.config.tfinal
        pattern = None
        if t < final_start:
            self.update_importance()
            self.budget, mask_now = self.schedule(t)
            if mask_now:
                pattern = self.mask_to_budget(self.budget)
        elif t == final_start or self.final_pattern is None:
            self.budget = self.target_budget
            pattern = self.final_pattern = self.mask_to_budget(self.budget)
            self.reset_importance()
        else:
            self.budget = self.target_budget
            self.apply_pattern(self.final_pattern)
            pattern = self.final_pattern
        for _, layer in self.layers:
            layer.allocated()
        return self.budget, pattern

    # --- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        host = {k: backend.to_numpy(v).copy() for k, v in self.ema_ipt.items()}
        unc = {k: backend.to_numpy(v).copy() for k, v in self.ema_unc.items()}
        return {"total_step": self.total_step, "budget": self.budget, "ema_ipt": host,
                "ema_unc": unc, "final_pattern": self.final_pattern,
                "rank_pattern": {name: list(layer.rank_pattern) for name, layer in self.layers}}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self._params())
        unknown = sorted(set(state["ema_ipt"]) - set(params))
        if unknown:
            raise ValueError(f"AdaLoRA allocator state for unknown parameters: {unknown[:5]}")
        self.total_step = state["total_step"]
        self.budget = int(state["budget"])
        self.reset_importance()
        for key, saved in state["ema_ipt"].items():
            p = params[key]
            xp = backend.get_namespace(p.data)
            for target, source in ((self.ema_ipt, saved), (self.ema_unc, state["ema_unc"][key])):
                if tuple(source.shape) != tuple(p.shape):
                    raise ValueError(f"AdaLoRA importance for {key} has shape "
                                     f"{tuple(source.shape)}, parameter has {tuple(p.shape)}")
                target[key] = backend.asarray(source, dtype=p.dtype, xp=xp)
        final = state.get("final_pattern")
        self.final_pattern = None if final is None else {k: [bool(v) for v in pat]
                                                         for k, pat in final.items()}
        self._final_masks = None
        for name, layer in self.layers:
            saved = (state.get("rank_pattern") or {}).get(name)
            if saved is not None:
                layer.rank_pattern = [bool(v) for v in saved]
