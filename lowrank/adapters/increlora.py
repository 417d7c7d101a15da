"""IncreLoRA (Zhang et al., 2308.12043) — the rank grows where it matters (docs/variants.md#increlora).

SVD-form triplets as AdaLoRA, with ranknum = the number of triplets the module holds:

    Ã = E ⊙_rows A (ranknum, n),   y = x W0ᵀ + b0 + c · (x_d Ãᵀ) Bᵀ,   c = α / (ranknum + 1e-5)

``A ~ N(0, 0.02²)`` ("lora_A.weight"), ``E = 0`` ("lora_E"), ``B ~ N(0, 0.02²)``
("lora_B.weight"); the +1e-5 is the official code's (``scaling / (ranknum + 1e-5)``).

Backward, with G = dL/dy and u = x_d Ãᵀ (N, ranknum):
    dB = c Gᵀ u,   du = c G B,   dÃ = duᵀ x_d,   dA = E ⊙_rows dÃ,   dE = Σ_cols(dÃ ⊙ A)
    dx = G W0 + (du Ã) ⊙ mask          (= G (W0 + c B Ã) without dropout)

Growth (``IncreLoraHook``, run by the Trainer after every optimizer step):
* module score, while the budget is not reached (the official backward hook on ΔW):
  ``s = Σ|ΔW ⊙ ∂L/∂ΔW| / √(m n)``, ``∂L/∂ΔW = Gᵀ x_d`` summed over micro-batches, ΔW before
  the step; smoothed as the official RankAllocator: ``Ī ← β1 Ī + (1-β1) s``,
  ``Ū ← β2 Ū + (1-β2) |s - Ī|``, importance ``Ī · Ū``. This costs one extra (m, n) product
  per module and step until the budget is reached, as in the official code.
* after completed step t with ``t > init_warmup`` and ``t % incre_interval == 0``, the
  ``top_h`` modules with the highest importance (ties: model order) that still have room
  (rank < min(m, n)) each activate ``add_r`` reserve triplets (fewer for the last one, so
  the total lands on the budget exactly), until ``Σ ranknum == total_budget``.
* a reserve triplet is A, B ~ N(0, 0.02²), E = 0. It is drawn from the layer's own host
  stream when it is activated: without the paper's "advance learning" (not implemented) a
  reserve is only its random init, so drawing it then is the same thing, holds no memory,
  and resumes exactly from the stream's state.
* c follows the rank, c_new = α / (ranknum + k + 1e-5). The official code lets every output
  jump by c_new/c_old at a growth; here E is rescaled by c_old/c_new in the same step, so
  c_new·E_new = c_old·E_old and, with the new E = 0, the output is unchanged (to rounding).
* A, E, B grow in place (the same Parameter objects, longer arrays), so the optimizer, the
  checkpoint keys and resume keep working. The grown module's A, E, B restart their AdamW
  state (``optimizer.add_param(name, p)``): the new triplets get a fresh state with t = 1,
  as a new param group gets in the official code. Padding the old moments with zeros
  instead would keep the old triplets' moments, but torch-AdamW keeps one step counter per
  tensor, so the new rows would get an uncorrected first update ~3x lr; the reset costs the
  old triplets of that module their moment history (their first update is then ±lr).
* ``total_budget`` (total rank over all modules; default ``r`` per module, so ``r`` is the
  average final rank, the size of a LoRA of rank r) must lie in Σ init_r .. Σ min(m, n).

Saving stores the grown arrays; loading adopts the saved rank (``expand_adapter_tensors``
grows the layer to it with outputs unchanged, before the arrays are assigned).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import backend
from ..decompose import check_rank
from ..module import Parameter
from ._increlora_hook import IncreLoraHook, total_budget
from ._triplets import TripletMap
from .base import AdaptedLinear, AdapterConfig, check_int, register

RANKNUM_EPS = 1e-5      # official: lora_alpha / (ranknum + 1e-5)
INIT_STD = 0.02         # A, B ~ N(0, 0.02²) for the first and every reserve triplet


@dataclass
class IncreLoraConfig(AdapterConfig):
    """``r``: average final rank per module (the budget); the rest as the official allocator."""

    init_r: int | None = None          # starting rank per module; None: max(1, r // 4)
    add_r: int | None = None           # triplets a chosen module gains; None: max(1, r // 2)
    total_budget: int | None = None    # Σ ranknum to reach; None: r per module
    top_h: int = 3                     # modules that grow at each growth step
    init_warmup: int = 20              # steps before the first growth
    incre_interval: int = 10           # steps between growths
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self):
        super().__post_init__()
        check_int("init_r", self.init_r, 1, optional=True)
        if self.init_r is None:
            self.init_r = max(1, self.r // 4)
        if self.init_r > self.r:
            raise ValueError(f"init_r must be <= r = {self.r} (r is the average final rank, "
                             f"the budget per module), got init_r={self.init_r}")
        check_int("add_r", self.add_r, 1, optional=True)
        if self.add_r is None:
            self.add_r = max(1, self.r // 2)
        check_int("total_budget", self.total_budget, 1, optional=True)
        if self.total_budget is not None and self.total_budget < self.init_r:
            raise ValueError(f"total_budget must be >= init_r = {self.init_r} (a budget below "
                             f"the starting rank), got {self.total_budget}")
        check_int("top_h", self.top_h, 1)
        check_int("init_warmup", self.init_warmup, 0)
        check_int("incre_interval", self.incre_interval, 1)
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
            setattr(self, name, float(getattr(self, name)))


@register("increlora", IncreLoraConfig)
class IncreLoraLinear(TripletMap, AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        m, n = self.weight.shape
        dtype, xp = self.weight.dtype.name, self.xp
        self.lora_A = Parameter(backend.host_normal(rng, (cfg.init_r, n), INIT_STD, dtype, xp))
        self.lora_E = Parameter(xp.zeros((cfg.init_r,), dtype=dtype))                  # (r,)
        self.lora_B = Parameter(backend.host_normal(rng, (m, cfg.init_r), INIT_STD, dtype, xp))
        self.track_score = False    # set by the hook while the budget is not reached
        self.score = None           # 0-d: Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn) of the current step
        self.grad_dW = None         # ∂L/∂ΔW (m, n) summed over the step's micro-batches

    @property
    def ranknum(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def scaling(self) -> float:
        return self.config.alpha / (self.ranknum + RANKNUM_EPS)

    @property
    def capacity(self) -> int:
        return int(min(self.weight.shape))

    # --- the adapted map (the triplet product, _triplets.py) ----------------------------------
    def correction_backward(self, dy2, cache, need_dx: bool):
        """The triplet gradients; while scoring, also ∂L/∂ΔW = Gᵀ x_d, summed over the step's
        micro-batches for the hook to turn into the score (docs/variants.md#increlora-score)."""
        if self.track_score and self.training:
            grad = dy2.T @ cache.x2                                      # (m, n) = ∂L/∂ΔW
            if self.grad_dW is None:
                self.grad_dW = grad
            else:
                self.grad_dW += grad
        return super().correction_backward(dy2, cache, need_dx)

    def step_score(self):
        """The official score Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn) (0-d, no host sync); ΔW is the weight the
        step's gradients were taken at (the hook calls this before the optimizer step)."""
        delta = self.delta_weight()                                      # (m, n)
        delta *= self.grad_dW
        m, n = delta.shape
        return self.xp.abs(delta).sum() / math.sqrt(m * n)

    # --- growth ----------------------------------------------------------------------------
    def grow(self, k: int, draw: bool = True) -> None:
        """Activate ``k`` more triplets (A, B from the host stream, or zeros with ``draw=False``;
        E = 0) and rescale E by c_old/c_new: the output does not change."""
        m, n = self.weight.shape
        room = self.capacity - self.ranknum
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= room:
            raise ValueError(f"k must be an integer in 1..{room} (rank "
                             f"{self.ranknum} of at most min(m, n) = {self.capacity}), got {k!r}")
        if self.merged:
            raise RuntimeError("grow() on a merged adapter: unmerge() first")
        xp, dtype = self.xp, self.dtype.name
        if draw:
            A_new = backend.host_normal(self._host_rng, (k, n), INIT_STD, dtype, xp)  # (k, n)
            B_new = backend.host_normal(self._host_rng, (m, k), INIT_STD, dtype, xp)  # (m, k)
        else:
            A_new, B_new = xp.zeros((k, n), dtype=dtype), xp.zeros((m, k), dtype=dtype)
        c_old = self.scaling
        c_new = self.config.alpha / (self.ranknum + k + RANKNUM_EPS)
        E = self.lora_E.data * (c_old / c_new)                           # (r,)
        self.lora_A.data = xp.concatenate([self.lora_A.data, A_new], axis=0)    # (r+k, n)
        self.lora_E.data = xp.concatenate([E, xp.zeros((k,), dtype=dtype)])     # (r+k,)
        self.lora_B.data = xp.concatenate([self.lora_B.data, B_new], axis=1)    # (m, r+k)
        for p in (self.lora_A, self.lora_E, self.lora_B):
            p.grad = None   # the old shapes; the trainer's zero-grad allocates the new ones
        self.grad_dW = None

    def end_step(self) -> None:
        """Forget the step's score buffers (the hook calls this after reading the score)."""
        self.score = None
        self.grad_dW = None

    # --- save / load (used by lowrank.checkpoint) --------------------------------------------
    def adapter_metadata(self) -> dict:
        return {"ranknum": self.ranknum}

    def expand_adapter_tensors(self, tensors: dict, extra: dict) -> dict:
        """The rank is training state: take the saved one. Growing with zero triplets keeps the
        outputs, so a load that fails afterwards leaves the layer's map as it was."""
        shapes = {k: tuple(tensors[k].shape) for k in ("lora_A", "lora_E", "lora_B")
                  if k in tensors}
        if "lora_A" not in shapes:
            return {}
        m, n = self.weight.shape
        R = shapes["lora_A"][0]
        want = {"lora_A": (R, n), "lora_E": (R,), "lora_B": (m, R)}
        bad = {k: s for k, s in shapes.items() if s != want[k]}
        if bad or not 1 <= R <= self.capacity:
            raise ValueError(f"IncreLoRA tensors {shapes} do not form a rank-R adapter of this "
                             f"{m}x{n} layer (need {want}, 1 <= R <= {self.capacity})")
        if R > self.ranknum:
            self.grow(R - self.ranknum, draw=False)
        elif R < self.ranknum:   # a smaller saved adapter into a grown layer: no map to keep
            xp, dtype = self.xp, self.dtype.name
            self.lora_A.data = xp.zeros((R, n), dtype=dtype)
            self.lora_E.data = xp.zeros((R,), dtype=dtype)
            self.lora_B.data = xp.zeros((m, R), dtype=dtype)
        return {}

    # --- training and reporting ------------------------------------------------------------
    @classmethod
    def step_hook(cls, model):
        return IncreLoraHook(cls.layers_of(model))

    def demo_report(self) -> dict:
        return {"ranknum": self.ranknum}

    @classmethod
    def report(cls, model, out) -> list[str]:
        layers = cls.layers_of(model)
        if not layers:
            return []
        total = sum(m.ranknum for _, m in layers)
        start = sum(m.config.init_r for _, m in layers)
        budget = total_budget(layers)
        width = max(len(n) for n, _ in layers) + 2
        lines = [f"IncreLoRA: total rank {total} of budget {budget} "
                 f"({'reached' if total == budget else 'not reached'}; started at {start})"]
        lines += [f"  {name.ljust(width)}rank {m.ranknum}" for name, m in layers]
        return lines


__all__ = ["IncreLoraConfig", "IncreLoraLinear", "total_budget", "RANKNUM_EPS"]
