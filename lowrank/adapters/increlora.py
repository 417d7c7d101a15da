"""IncreLoRA (Zhang et al., 2308.12043) — the rank grows where it matters (docs/variants.md#increlora).

SVD-form triplets as AdaLoRA, with ranknum = the number of *active* triplets:

    Ã = E ⊙_rows A (R, n),   y = x W0ᵀ + b0 + c · (x_d Ãᵀ) Bᵀ,   c = α / (ranknum + 1e-5)

``A ~ N(0, 0.02²)`` ("lora_A.weight"), ``E = 0`` ("lora_E"), ``B ~ N(0, 0.02²)``
("lora_B.weight"); the +1e-5 is the official code's (``scaling / (ranknum + 1e-5)``). The
arrays hold R = ranknum + reserve rows: the official ``add_reserve_param`` triplets, created
after step 0 (``add_r`` per module) and refilled at every growth. With ``advance_learning``
(official default) a reserve has E = 1e-5 frozen and A, B trainable, so it is pre-trained
before it is activated; without, E = 0 and A, B frozen. Reserves are part of the map (the
official ``loraW`` concatenates every triplet), scaled by the active ranknum.

Backward, with G = dL/dy and u = x_d Ãᵀ (N, R):
    dB = c Gᵀ u,   du = c G B,   dÃ = duᵀ x_d,   dA = E ⊙_rows dÃ,   dE = Σ_cols(dÃ ⊙ A)
    dx = G W0 + (du Ã) ⊙ mask          (= G (W0 + c B Ã) without dropout)
(the step hook zeroes the frozen rows' gradients: a reserve's E, and without advance learning
its A and B).

Growth (``_increlora_hook.IncreLoraHook``, docs/variants.md#increlora-score): a module gains k
triplets by activating k reserves (``ranknum += k``) and drawing k new reserves. ``growth``:
"official" leaves E alone, so the module's existing ΔW shrinks by ranknum / (ranknum + k) and
the output jumps; "rescale" multiplies the active E by c_old / c_new first, so the output does
not change but for the activated reserves' E = 1e-5. A, E, B grow in place (the same
Parameter objects, longer arrays); the hook steps them itself, with one AdamW state per
triplet as the official per-triplet tensors have.

``total_budget`` (total rank over all modules; default ``r`` per module, so ``r`` is the
average final rank) must lie in Σ init_r .. Σ min(m, n). Saving stores the whole arrays and
``ranknum``; loading adopts them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import backend
from ..nn.decompose import check_rank
from ..nn.module import Parameter
from ._increlora_hook import IncreLoraHook, total_budget
from ._triplets import TripletMap
from .base import AdaptedLinear, AdapterConfig, Report, check_int, register

RANKNUM_EPS = 1e-5      # official: lora_alpha / (ranknum + 1e-5)
INIT_STD = 0.02         # A, B ~ N(0, 0.02²) for the first and every reserve triplet
RESERVE_E = 1e-5        # official add_reserve_param: e = 1e-5 with advance learning
GROWTHS = ("official", "rescale")
SCORE_BATCHES = ("last", "sum")
RESERVE_LRS = ("multi", "constant", "schedule")
ORTH_FORMS = ("svd", "per_tensor")


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
    advance_learning: bool = True      # reserves pre-trained with E = 1e-5 (official default)
    growth: str = "official"           # GROWTHS: E left alone, or rescaled (output kept)
    score_batches: str = "last"        # SCORE_BATCHES: the last micro-batch's ∂L/∂ΔW, or Σ
    reg_orth_coef: float = 0.1         # the orthogonality regulariser's weight; 0: off
    orth_form: str = "svd"             # ORTH_FORMS: the trainers' compute_svd_orth_regu
    reserve_lr: str = "multi"          # RESERVE_LRS: added groups warm up anew (Multi_LambdaLR)

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
        if not isinstance(self.advance_learning, bool):
            raise ValueError(f"advance_learning must be a bool, got {self.advance_learning!r}")
        for name, allowed in (("growth", GROWTHS), ("score_batches", SCORE_BATCHES),
                              ("reserve_lr", RESERVE_LRS), ("orth_form", ORTH_FORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        c = self.reg_orth_coef
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0.0:
            raise ValueError(f"reg_orth_coef must be a number >= 0, got {c!r}")
        self.reg_orth_coef = float(c)


@register("increlora", IncreLoraConfig)
class IncreLoraLinear(TripletMap, AdaptedLinear):
    official_schedule = "linear"   # the official runs: Hugging Face Trainer, linear warm-up
    official_adamw = "hf"          # and decay, transformers.AdamW (docs/variants.md#increlora)

    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        m, n = self.weight.shape
        dtype, xp = self.weight.dtype.name, self.xp
        self.lora_A = Parameter(backend.host_normal(rng, (cfg.init_r, n), INIT_STD, dtype, xp))
        self.lora_E = Parameter(xp.zeros((cfg.init_r,), dtype=dtype))                  # (r,)
        self.lora_B = Parameter(backend.host_normal(rng, (m, cfg.init_r), INIT_STD, dtype, xp))
        self.ranknum = cfg.init_r   # active triplets; the rows beyond are reserves
        self.track_score = False    # set by the hook while the budget is not reached
        self.score = None           # 0-d: Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn) of the current step
        self.grad_dW = None         # ∂L/∂ΔW (m, n): the last micro-batch's, or their sum

    @property
    def rows(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def reserve(self) -> int:
        return self.rows - self.ranknum

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
            if self.grad_dW is None or self.config.score_batches == "last":
                self.grad_dW = grad   # official: the backward hook overwrites its score
            else:
                self.grad_dW += grad
        return super().correction_backward(dy2, cache, need_dx)

    def reset_replica_state(self) -> None:
        self.grad_dW = None   # a batch shard's replica sums only its own rows

    def absorb_replica(self, replica) -> None:
        if replica.grad_dW is not None:   # the shards' ∂L/∂ΔW add up to the batch's
            mine = self.grad_dW
            self.grad_dW = replica.grad_dW if mine is None else mine + replica.grad_dW

    def step_score(self):
        """The official score Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn) (0-d, no host sync); ΔW is the weight the
        step's gradients were taken at (the hook calls this before the optimizer step)."""
        delta = self.delta_weight()                                      # (m, n)
        delta *= self.grad_dW
        m, n = delta.shape
        return self.xp.abs(delta).sum() / math.sqrt(m * n)

    # --- growth ----------------------------------------------------------------------------
    def add_reserve(self, k: int, draw: bool = True) -> None:
        """Append ``k`` reserve triplets (official ``add_reserve_param``): per triplet A (1, n)
        then B (m, 1) ~ N(0, 0.02²) from the host stream (zeros with ``draw=False``),
        E = 1e-5 with advance learning, else 0."""
        m, n = self.weight.shape
        xp, dtype = self.xp, self.dtype.name
        if self.merged:
            raise RuntimeError("growth on a merged adapter: unmerge() first")
        A_new, B_new = xp.zeros((k, n), dtype=dtype), xp.zeros((m, k), dtype=dtype)
        for i in range(k if draw else 0):
            A_new[i] = backend.host_normal(self._host_rng, (n,), INIT_STD, dtype, xp)
            B_new[:, i] = backend.host_normal(self._host_rng, (m,), INIT_STD, dtype, xp)
        e = RESERVE_E if self.config.advance_learning and draw else 0.0
        self.lora_A.data = xp.concatenate([self.lora_A.data, A_new], axis=0)    # (R+k, n)
        self.lora_E.data = xp.concatenate([self.lora_E.data,
                                           xp.full((k,), e, dtype=dtype)])      # (R+k,)
        self.lora_B.data = xp.concatenate([self.lora_B.data, B_new], axis=1)    # (m, R+k)
        for p in (self.lora_A, self.lora_E, self.lora_B):
            p.grad = None   # the old shapes; the trainer's zero-grad allocates the new ones
        self.grad_dW = None

    def grow(self, k: int, draw: bool = True) -> None:
        """Activate ``k`` more triplets: k reserves become active (``ranknum += k``; reserves
        are drawn first when fewer than k exist); "rescale" keeps the output by E ← E·c_old/c_new."""
        room = self.capacity - self.ranknum
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= room:
            raise ValueError(f"k must be an integer in 1..{room} (rank "
                             f"{self.ranknum} of at most min(m, n) = {self.capacity}), got {k!r}")
        if self.merged:
            raise RuntimeError("grow() on a merged adapter: unmerge() first")
        if self.reserve < k:
            self.add_reserve(k - self.reserve, draw)
        if self.config.growth == "rescale":
            c_old = self.scaling
            c_new = self.config.alpha / (self.ranknum + k + RANKNUM_EPS)
            self.lora_E.data[:self.ranknum] *= c_old / c_new
        self.ranknum += k
        self.grad_dW = None

    def switch_off_reserves(self) -> None:
        """E = 0 on every reserve (official, once the budget is reached)."""
        self.lora_E.data[self.ranknum:] = 0.0

    def end_step(self) -> None:
        """Forget the step's score buffers (the hook calls this after reading the score)."""
        self.score = None
        self.grad_dW = None

    # --- save / load (used by lowrank.formats.checkpoint) --------------------------------------------
    def adapter_metadata(self) -> dict:
        return {"ranknum": self.ranknum}

    def expand_adapter_tensors(self, tensors: dict, extra: dict) -> dict:
        """The rank is training state: take the saved rows and ``ranknum`` (the metadata's;
        files without it hold no reserves)."""
        shapes = {k: tuple(tensors[k].shape) for k in ("lora_A", "lora_E", "lora_B")
                  if k in tensors}
        if "lora_A" not in shapes:
            return {}
        m, n = self.weight.shape
        R = shapes["lora_A"][0]
        want = {"lora_A": (R, n), "lora_E": (R,), "lora_B": (m, R)}
        bad = {k: s for k, s in shapes.items() if s != want[k]}
        if bad or R < 1:
            raise ValueError(f"IncreLoRA tensors {shapes} do not form a rank-R adapter of this "
                             f"{m}x{n} layer (need {want}, R >= 1)")
        ranknum = int((extra or {}).get("ranknum", R))
        if not 1 <= ranknum <= min(R, self.capacity):
            raise ValueError(f"IncreLoRA ranknum {ranknum} does not fit {R} saved triplets")
        if R != self.rows:
            xp, dtype = self.xp, self.dtype.name
            self.lora_A.data = xp.zeros((R, n), dtype=dtype)
            self.lora_E.data = xp.zeros((R,), dtype=dtype)
            self.lora_B.data = xp.zeros((m, R), dtype=dtype)
            for p in (self.lora_A, self.lora_E, self.lora_B):
                p.grad = None
        self.ranknum = ranknum
        return {}

    # --- training and reporting ------------------------------------------------------------
    @classmethod
    def step_hook(cls, model):
        return IncreLoraHook(cls.layers_of(model))

    @classmethod
    def report(cls, model, out) -> Report:
        layers = cls.layers_of(model)
        if not layers:
            return Report()
        total = sum(m.ranknum for _, m in layers)
        start = sum(m.config.init_r for _, m in layers)
        budget = total_budget(layers)
        width = max(len(n) for n, _ in layers) + 2
        lines = [f"IncreLoRA: total rank {total} of budget {budget} "
                 f"({'reached' if total == budget else 'not reached'}; started at {start})"]
        lines += [f"  {name.ljust(width)}rank {m.ranknum}" for name, m in layers]
        return Report(lines, {name: {"ranknum": m.ranknum} for name, m in layers})


__all__ = ["IncreLoraConfig", "IncreLoraLinear", "total_budget", "RANKNUM_EPS"]
