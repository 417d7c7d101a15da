"""AdaLoRA (Zhang et al., 2303.10512) — adaptive rank from SVD-form triplets (docs/variants.md#adalora).

    Ã = E ⊙_rows A (r, n),   y = x W0ᵀ + b0 + c · (x_d Ãᵀ) Bᵀ,   c = α / (init_r + 1e-5)

``A (r, n) ~ N(0, 0.02²)`` ("lora_A.weight"), ``E (r,) = 0`` ("lora_E"; PEFT stores (r, 1)),
``B (m, r) ~ N(0, 0.02²)`` ("lora_B.weight"), r = init_r. The scaling is PEFT's exactly:
``lora_alpha / (ranknum + 1e-5)`` with ranknum = init_r, and it never changes, not even when
a pruned adapter is loaded with fewer triplets.

Backward, with G = dL/dy and u = x_d Ãᵀ (N, r):
    dB = c Gᵀ u,   du = c G B,   dÃ = duᵀ x_d,   dA = E ⊙_rows dÃ,   dE = Σ_cols(dÃ ⊙ A)
    dx = G W0 + (du Ã) ⊙ mask          (= G (W0 + c B Ã) without dropout)

The regulariser, importance scores, budget schedule and masks live in ``_adalora_allocator``;
``AdaLoraLinear.step_hook(model)`` is the hook the Trainer runs every step, so training through
``lowrank.training.trainer.Trainer`` cannot forget it (a layer driven by hand past ``total_step`` raises).

Config: ``r`` and ``init_r`` are one field (PEFT ignores ``r``); ``r`` defaults to 12, ``target_r``
to ``max(1, 2·init_r // 3)``; ``total_step=None`` means the trainer's steps (kept on resume).

Saving keeps the rows in use, ``saved_rows = rank_pattern | (E != 0)`` (a triplet revived
between two masks stays, so a reload reproduces the outputs; PEFT drops it); loading scatters
them back into the init_r-sized layer (docs/variants.md#adalora).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import backend
from ..nn.decompose import check_rank
from ..nn.hooks import StepHook
from ..nn.module import Parameter
from ._adalora_allocator import RankAllocator, budget_schedule, orth_regularizer
from ._triplets import TripletMap
from ..files.storage import host_copy
from ..nn.validate import MAX_ALPHA
from ._peft import (MAX_RANK, PEFT_PREFIX, Field, PeftCodec, Piece, bools, integer, kept,
                    missing_tensor, number, optional, pattern_dict, pattern_value, row_blocks,
                    scatter)
from .base import AdaptedLinear, AdapterConfig, Report, check_int, register
from .lora import LORA_FIELDS, lora_pair

RANKNUM_EPS, MATRIX_ORDER = 1e-5, ("q", "k", "v", "o", "fc1", "fc2")   # PEFT: α/(ranknum + ε)


@dataclass
class AdaLoraConfig(AdapterConfig):
    r: int = 12                       # = init_r (see the module docstring)
    init_r: int | None = None
    target_r: int | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    orth_squared: bool = False        # the paper's ‖·‖_F² instead of PEFT's ‖·‖_F

    def __post_init__(self):
        super().__post_init__()
        check_int("init_r", self.init_r, 1, optional=True)
        if self.init_r is None:
            self.init_r = self.r
        self.r = self.init_r
        if self.target_r is None:
            self.target_r = max(1, 2 * self.init_r // 3)
        check_int("target_r", self.target_r, 1)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r must be <= init_r, got target_r={self.target_r}, "
                             f"init_r={self.init_r}")
        check_int("tinit", self.tinit, 0)
        check_int("tfinal", self.tfinal, 0)
        check_int("deltaT", self.deltaT, 1)
        check_int("total_step", self.total_step, 1, optional=True)
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
            setattr(self, name, float(getattr(self, name)))
        if not float(self.orth_reg_weight) >= 0.0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        self.orth_reg_weight = float(self.orth_reg_weight)
        if not isinstance(self.orth_squared, bool):
            raise ValueError(f"orth_squared must be a bool, got {self.orth_squared!r}")
        if self.total_step is not None and not self.tinit + self.tfinal < self.total_step:
            raise ValueError(f"tinit + tfinal must be < total_step, got tinit={self.tinit}, "
                             f"tfinal={self.tfinal}, total_step={self.total_step}")


@register("adalora", AdaLoraConfig)
class AdaLoraLinear(TripletMap, AdaptedLinear):
    def init_adapter(self, rng) -> None:
        cfg = self.config
        check_rank(cfg.r, self.weight.shape)
        m, n = self.weight.shape
        dtype, xp = self.weight.dtype.name, self.xp
        self.scaling = cfg.alpha / (cfg.init_r + RANKNUM_EPS)
        self.lora_A = Parameter(backend.host_normal(rng, (cfg.r, n), 0.02, dtype, xp))  # (r, n)
        self.lora_E = Parameter(xp.zeros((cfg.r,), dtype=dtype))                         # (r,)
        self.lora_B = Parameter(backend.host_normal(rng, (m, cfg.r), 0.02, dtype, xp))  # (m, r)
        self.rank_pattern = [True] * cfg.r
        self._steps_since_allocation = 0
        self._step_grad = None

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def realised_rank(self) -> int:
        return int(sum(self.rank_pattern))

    # --- the adapted map (the triplet product, _triplets.py) ----------------------------------
    def correction_backward(self, dy2, cache, need_dx: bool):
        """The triplet gradients, counting the step for the allocator check below."""
        if self.training:
            self._count_step()
        dx = super().correction_backward(dy2, cache, need_dx)
        self._step_grad = self.lora_E.grad
        return dx

    def allocated(self) -> None:
        """The allocator ran: the steps-without-allocator count starts again."""
        self._steps_since_allocation = 0

    def _count_step(self) -> None:
        """A new step starts when E's gradient array is a fresh one (a zero-grad happened)."""
        if not self.lora_E.trainable or (self.lora_E.grad is not None
                                         and self.lora_E.grad is self._step_grad):
            return
        self._steps_since_allocation += 1
        limit = self.config.total_step
        if limit is not None and self._steps_since_allocation > limit:
            raise RuntimeError(
                f"AdaLoRA: this layer has been trained for more than total_step={limit} steps "
                "without its rank allocator, so it was never pruned. Train with "
                "lowrank.training.trainer.Trainer (it runs the allocator), or call "
                "hook = AdaLoraLinear.step_hook(model) once and hook.after_step(trainer) after "
                "every optimizer step, before zero-grad.")

    # --- save / load (used by lowrank.formats.checkpoint) -----------------------------------------------
    def saved_rows(self) -> list[bool]:
        """Triplets the saved adapter keeps: in the pattern, or revived since the last mask."""
        nonzero = (self.lora_E.data != 0).tolist()
        return [bool(p or e) for p, e in zip(self.rank_pattern, nonzero)]

    def adapter_metadata(self) -> dict:
        return {"init_r": self.r, "target_r": self.config.target_r, "rank": self.realised_rank,
                "rank_pattern": list(self.rank_pattern), "saved_rows": self.saved_rows()}

    def adapter_tensors(self) -> dict:
        """What the adapter file holds: the kept rows of A and E and columns of B."""
        keep = self.xp.asarray([i for i, k in enumerate(self.saved_rows()) if k], dtype="int64")
        return {"lora_A": self.lora_A.data[keep], "lora_E": self.lora_E.data[keep],
                "lora_B": self.lora_B.data[:, keep]}

    def expand_adapter_tensors(self, tensors: dict, extra: dict) -> dict:
        """Saved (sliced) host arrays -> init_r-sized arrays on this layer's backend."""
        rows = (extra or {}).get("saved_rows")
        if rows is None:
            return tensors
        if len(rows) != self.r:
            raise ValueError(f"the saved AdaLoRA module has init_r={len(rows)} triplets, this "
                             f"layer has {self.r}; inject with the saved config")
        xp, kept = self.xp, [i for i, k in enumerate(rows) if k]
        keep = xp.asarray(kept, dtype="int64")
        out = dict(tensors)
        for pname, axis in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            if pname not in tensors:
                continue
            p, saved = getattr(self, pname), tensors[pname]
            if saved.shape[axis] != len(kept):
                raise ValueError(f"{pname}: the saved tensor has {saved.shape[axis]} triplets, "
                                 f"its saved_rows pattern keeps {len(kept)}")
            full = xp.zeros(p.shape, dtype=p.dtype)
            if axis == 0:
                full[keep] = backend.asarray(saved, dtype=p.dtype, xp=xp)
            else:
                full[:, keep] = backend.asarray(saved, dtype=p.dtype, xp=xp)
            out[pname] = full
        return out

    def load_adapter_metadata(self, extra: dict) -> None:
        pattern = (extra or {}).get("rank_pattern")
        if pattern is not None and len(pattern) == self.r:
            self.rank_pattern = [bool(v) for v in pattern]

    # --- training and reporting ------------------------------------------------------------------
    @classmethod
    def step_hook(cls, model):
        return AdaLoraHook(model)

    @classmethod
    def report(cls, model, out) -> Report:
        ranks = realised_ranks(model)
        if not ranks:
            return Report()
        layers = [m for _, m in cls.layers_of(model)]
        init = sum(m.r for m in layers)
        target = sum(m.config.target_r for m in layers)
        rows, cols, grid = rank_grid(ranks)
        width = max(len(r) for r in rows) + 2
        lines = [f"AdaLoRA final ranks: {sum(ranks.values())} of {init} triplets active "
                 f"(budget Σ target_r = {target})",
                 "  " + "final rank".ljust(width) + "".join(f"{c:>5}" for c in cols)]
        if sum(ranks.values()) > target:   # training ended before the schedule did
            lines.insert(1, f"  budget not reached: {sum(ranks.values())} > {target} triplets "
                            "active; train at least total_step steps (the schedule reaches "
                            "the budget at total_step - tfinal)")
        for row in rows:
            cells = "".join(f"{'-' if grid[row].get(c) is None else grid[row][c]:>5}"
                            for c in cols)
            lines.append("  " + row.ljust(width) + cells)
        targets = {m.config.target_r for m in layers}
        values = list(ranks.values())
        uniform = len(targets) == 1 and all(v == next(iter(targets)) for v in values)
        lines.append(f"  {'uniform' if uniform else 'not uniform'}: ranks {min(values)}.."
                     f"{max(values)} (target_r = {', '.join(map(str, sorted(targets)))} each)")
        if out is not None:
            lines.append(f"  heatmap: {plot_ranks(ranks, Path(out) / 'adalora_ranks.png')}")
        return Report(lines, {n: {"rank": m.realised_rank, "init_r": m.r,
                                  "target_r": m.config.target_r} for n, m in cls.layers_of(model)})


class AdaLoraHook(StepHook):
    """The per-step hook of a model's AdaLoRA layers (see lowrank.training.trainer)."""

    def __init__(self, model):
        self.layers = AdaLoraLinear.layers_of(model)
        if not self.layers:
            raise ValueError("the model holds no AdaLoRA layers")
        self.config = self.layers[0][1].config
        self.allocator = RankAllocator(self.layers, self.config)

    def extra_loss(self, trainer) -> float:
        self.allocator.resolve_total(trainer.config.steps)
        return orth_regularizer([m for _, m in self.layers], self.config.orth_reg_weight,
                                self.config.orth_squared)

    def after_step(self, trainer) -> None:
        self.allocator.resolve_total(trainer.config.steps)
        self.allocator.step(trainer.step)

    def state_dict(self) -> dict:
        dropped = {}
        for name, m in self.layers:
            rows = [i for i, k in enumerate(m.saved_rows()) if not k]
            if rows:
                idx = m.xp.asarray(rows, dtype="int64")
                dropped[name] = {"rows": rows, "lora_A": backend.to_numpy(m.lora_A.data[idx]),
                                 "lora_B": backend.to_numpy(m.lora_B.data[:, idx])}
        return {"allocator": self.allocator.state_dict(), "dropped": dropped}

    def load_state_dict(self, state: dict) -> None:
        self.allocator.load_state_dict(state["allocator"])
        modules = dict(self.layers)
        for name, saved in (state.get("dropped") or {}).items():
            m = modules[name]
            idx = m.xp.asarray(saved["rows"], dtype="int64")
            m.lora_A.data[idx] = backend.asarray(saved["lora_A"], dtype=m.dtype, xp=m.xp)
            m.lora_B.data[:, idx] = backend.asarray(saved["lora_B"], dtype=m.dtype, xp=m.xp)


# --- export ------------------------------------------------------------------------------------

def rank_pattern(model) -> dict:
    """``{module name: [bool per triplet]}`` of every AdaLoRA layer (PEFT's ``rank_pattern``)."""
    return {n: list(m.rank_pattern) for n, m in AdaLoraLinear.layers_of(model)}


def realised_ranks(model) -> dict:
    return {n: m.realised_rank for n, m in AdaLoraLinear.layers_of(model)}


def rank_grid(ranks: dict):
    """``(rows, cols, {row: {col: rank}})``: rows ``blocks.i``, columns the matrix names."""
    grid: dict = {}
    for name, rank in ranks.items():
        match = re.match(r"(.*?blocks\.\d+)\.(?:.*\.)?([^.]+)$", name)
        row, col = match.groups() if match else (name.rpartition(".")[0] or name,
                                                 name.rpartition(".")[2])
        grid.setdefault(row, {})[col] = rank
    cols = sorted({c for r in grid.values() for c in r},
                  key=lambda c: (MATRIX_ORDER.index(c) if c in MATRIX_ORDER else 99, c))
    rows = sorted(grid, key=lambda r: [int(t) if t.isdigit() else t for t in r.split(".")])
    return rows, cols, grid


def plot_ranks(ranks: dict, path) -> Path:
    """Heatmap of the final rank per layer (rows) and matrix (columns), as in the paper."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols, grid = rank_grid(ranks)
    values = [[grid[r].get(c, float("nan")) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 1.2 + 0.5 * len(rows)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    top = max(max(grid[r].values()) for r in rows) or 1
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:   # dark text on the bright end of viridis
                ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=9,
                        color="k" if v > 0.6 * top else "w")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title("AdaLoRA final rank")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- PEFT's format (docs/peft.md#codecs) -----------------------------------------------------

ADALORA_FIELDS = {**LORA_FIELDS,
                  "rank_pattern": Field(optional(pattern_dict(bools))),
                  **{k: Field(integer(0, 1 << 40)) for k in ("tinit", "tfinal")},
                  **{k: Field(optional(integer(1, MAX_RANK))) for k in ("init_r", "target_r")},
                  "deltaT": Field(integer(1, 1 << 40)),
                  "total_step": Field(optional(integer(1, 1 << 40))),
                  **{k: Field(number(0.0, 1.0, True, True)) for k in ("beta1", "beta2")},
                  "orth_reg_weight": Field(number(0.0, MAX_ALPHA))}
SCHEDULE = ("tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


class AdaLoraCodec(PeftCodec):
    """PEFT's ADALORA: the kept triplets; ``rank_pattern {module.lora_E: [bool]}`` says which."""

    peft_type, fused, fields = "ADALORA", True, ADALORA_FIELDS
    module_keys = ("lora_A", "lora_B", "lora_E")

    def check_config(self, info, where):   # the schedule's own cross-field checks
        try:
            AdaLoraConfig(r=info.get("init_r") or 12, target_r=info.get("target_r"),
                          **{k: info[k] for k in SCHEDULE if info.get(k) is not None})
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def piece(self, layer, original_weight) -> Piece:
        keep = kept(layer.saved_rows())
        A, B, E = (host_copy(p.data) for p in (layer.lora_A, layer.lora_B, layer.lora_E))
        return Piece("adalora", A[keep], B[:, keep], layer.scaling, E=E[keep],
                     pattern=tuple(layer.saved_rows()))

    def save(self, items, cfg):
        """PEFT scales by α over one init_r (B absorbs a module's other ratio) and refuses
        ``total_step`` None (an open schedule saves the smallest valid one)."""
        init_r = max(len(p.pattern) for p in items.values())
        scale = cfg.alpha / (init_r + RANKNUM_EPS)
        tensors, patterns = {}, {}
        for name, p in items.items():
            B = p.B if p.scale == scale else (p.B * (p.scale / scale)).astype(p.B.dtype)
            key = f"{PEFT_PREFIX}{name}."
            tensors.update({key + "lora_A": p.A, key + "lora_B": B,
                            key + "lora_E": p.E.reshape(-1, 1)})                   # (r, 1)
            patterns[f"{name}.lora_E"] = list(p.pattern) + [False] * (init_r - len(p.pattern))
        return tensors, {
            "r": 8, "init_r": init_r,   # PEFT ignores r (and warns unless it is its default)
            "target_r": min(cfg.target_r, init_r), "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "bias": cfg.bias,
            **{k: getattr(cfg, k) for k in SCHEDULE},
            "total_step": cfg.total_step or cfg.tinit + cfg.tfinal + 1,
            "rank_pattern": patterns, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True}

    def load_module(self, peft_name, found, info, parts, where):
        A, B = lora_pair(peft_name, found, ("lora_A", "lora_B"), where)
        if "lora_E" not in found:
            raise missing_tensor(where, peft_name, "lora_E")
        r, E = A.shape[0], found["lora_E"].reshape(-1)
        init_r = int(info.get("init_r") or r)
        pattern = pattern_value(info.get("rank_pattern"), f"{peft_name}.lora_E",
                                [True] * init_r)
        if len(pattern) != init_r or sum(pattern) != r or E.shape != (r,):
            raise ValueError(f"{where}: module {peft_name!r}: rank_pattern keeps "
                             f"{sum(pattern)} of {len(pattern)} triplets, the tensors hold "
                             f"{r} (lora_E {found['lora_E'].shape}) of init_r={init_r}")
        keep = kept(pattern)
        full_A, full_E = scatter(A, keep, init_r, 0), scatter(E, keep, init_r, 0)
        full_B = scatter(B, keep, init_r, 1)
        fields = {"r": init_r, "alpha": float(info["lora_alpha"]), "bias": "none",
                  "dropout": float(info.get("lora_dropout") or 0.0),
                  "target_r": min(int(info.get("target_r") or init_r), init_r),
                  **{k: info[k] for k in SCHEDULE if info.get(k) is not None}}
        return [(name, "adalora", dict(fields),
                 {"lora_A": full_A, "lora_E": full_E, "lora_B": full_B[rows]},
                 {"rank_pattern": list(pattern)}) for name, rows in row_blocks(parts, B.shape[0])]


AdaLoraLinear.peft_codec = AdaLoraCodec()


__all__ = ["AdaLoraConfig", "AdaLoraLinear", "AdaLoraHook", "RankAllocator", "budget_schedule",
           "orth_regularizer", "rank_pattern", "realised_ranks", "plot_ranks", "RANKNUM_EPS"]
