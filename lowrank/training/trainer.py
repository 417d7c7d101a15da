"""The training loop: AdamW (torch or HF form), clipping, schedules, accumulation, hooks.

One step, always in this order (docs/training.md#step-order; schedule-driven variants depend
on it):

    forward/backward (× accum_steps) → hooks.extra_loss (regularisers add their gradients)
    → clip → optimizer step → hooks.after_step (masks, rank growth, restarts) → zero-grad

Hooks are ``lowrank.nn.hooks.StepHook`` instances (``bind``, ``owns``, ``extra_loss``, ``lr_at``,
``after_step``, ``state_dict``/``load_state_dict``, each with a no-op default). An adapter
class that needs one returns it from ``step_hook(model)``; ``hooks_for`` hands it to the
trainer, so no user has to remember to call it.

Data parallel (``comm`` of size K > 1, see ``lowrank.parallel``): every rank samples the same
global batch of ``batch_size`` rows with the same host RNG and computes on its contiguous
``batch_size / K`` rows; the mean gradients (and the loss) are averaged over the ranks right
after the backward, before ``extra_loss``, so a regulariser's gradient (computed from the
identical parameters on every rank) is added once, not K times, and every hook sees the
same numbers one process would. A hook that collects statistics of its own from local
activations must sum them with ``trainer.comm.allreduce_sum``. Evaluation shards the eval
batches round-robin over the ranks and averages. Every ``check_every`` steps the ranks
compare parameter checksums and stop with ``ParameterDriftError`` if they differ.

Batch shards (``shards`` K > 1, ``lowrank.parallel.BatchShards``): each micro-batch's rows are
split over K threads of this process, and the shards' gradients are summed right after the
backward, where data parallel averages its ranks' (docs/performance.md#batch-shards).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import backend
from ..adapters import adapted_modules
from .batches import as_batch
from ..nn.hooks import StepHook
from ..models import Embedding
from ..nn.optim import AdamW, check_adamw_form, clip_grad_norm, loraplus_scales
from ..parallel import BatchShards, GradientAllReduce, SingleProcess
from ..nn.schedules import Schedule, check_schedule
from .progress import progress_bar
from ..nn.validate import check_number


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
    loraplus_lr_ratio: float | None = None   # LoRA+: B learns at this × lr (docs/variants.md#loraplus)
    loraplus_lr_embedding: float = 1e-6
    shards: int = 1               # batch shards on threads (docs/performance.md#batch-shards)
    schedule: str | None = None   # SCHEDULES; None: the variant's official one (lowrank_cosine)
    adamw: str | None = None      # ADAMW_FORMS; None: the variant's official one (torch)

    def __post_init__(self):
        for name in ("steps", "batch_size", "accum_steps", "eval_batches", "shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup", "eval_interval", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            check_number(name, getattr(self, name), 0.0)
        if self.loraplus_lr_ratio is not None:
            check_number("loraplus_lr_ratio", self.loraplus_lr_ratio, 0.0, low_open=True)
        if self.schedule is not None:
            check_schedule(self.schedule)
        if self.adamw is not None:
            check_adamw_form(self.adamw)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")

    def to_dict(self) -> dict:
        return asdict(self)


def official_training(model, config: TrainConfig) -> tuple[str, str]:
    """``(schedule, adamw)`` of a run: the config's, else the first adapter class's official
    ``official_schedule`` / ``official_adamw`` (docs/variants.md#official-training), else
    lowrank's ``lowrank_cosine`` and torch's AdamW."""
    schedule, adamw = config.schedule, config.adamw
    for _, module in adapted_modules(model):
        schedule = schedule or getattr(type(module), "official_schedule", None)
        adamw = adamw or getattr(type(module), "official_adamw", None)
    return schedule or "lowrank_cosine", adamw or "torch"


def hooks_for(model) -> list:
    """The per-step hooks the model's adapters ask for (``adapter.step_hook(model)``), one
    per adapter class."""
    hooks, seen = [], set()
    for _, module in adapted_modules(model):
        if type(module) not in seen:
            seen.add(type(module))
            hook = type(module).step_hook(model)
            if hook is not None:
                hooks.append(hook)
    return hooks


class Trainer:
    def __init__(self, model, data, config: TrainConfig, hooks=None, comm=None,
                 check_every: int = 20):
        self.model, self.data, self.config = model, data, config
        self.comm = SingleProcess() if comm is None else comm
        size, rank = self.comm.size, self.comm.rank
        if config.batch_size % size:
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the "
                             f"number of processes ({size})")
        local = config.batch_size // size
        self.rows = slice(rank * local, (rank + 1) * local)   # this rank's share of a batch
        self.grad_sync = GradientAllReduce(model, self.comm) if size > 1 else None
        self.shards = BatchShards(model, config.shards) if config.shards > 1 else None
        self.check_every = int(check_every)
        self.schedule_name, self.adamw_form = official_training(model, config)
        self.schedule = Schedule(self.schedule_name, config.lr, config.warmup, config.steps,
                                 config.min_lr)
        self.hooks = hooks_for(model) if hooks is None else list(hooks)
        for hook in self.hooks:
            if not isinstance(hook, StepHook):
                raise ValueError(f"hooks must be lowrank.nn.hooks.StepHook instances, got "
                                 f"{type(hook).__name__}")
            hook.bind(self)   # a hook that needs the trainer (its comm) before step 1
        self.optimizer = AdamW([(n, p) for n, p in model.named_parameters(trainable_only=True)
                                if not any(h.owns(n, p) for h in self.hooks)],
                               lr=config.lr, weight_decay=config.weight_decay,
                               form=self.adamw_form)
        if not any(True for _ in model.named_parameters(trainable_only=True)):
            raise ValueError("the model has no trainable parameters")   # hooks may own all
        if config.loraplus_lr_ratio is not None:
            self._loraplus(config)
        self.rng = np.random.Generator(np.random.PCG64(config.seed))   # host: batch sampling
        self.step = 0
        self.tokens_seen = 0
        model.train()
        model.zero_grad()
        _jump_dropout_streams(model, rank)

    def _loraplus(self, config) -> None:
        embeddings = {f"{mname}.{pname}" if mname else pname
                      for mname, m in self.model.named_modules() if isinstance(m, Embedding)
                      for pname, _ in m.named_parameters()}
        params = list(self.optimizer.params.items())
        for name, factor in loraplus_scales(params, config.loraplus_lr_ratio, config.lr,
                                            embeddings, config.loraplus_lr_embedding).items():
            self.optimizer.set_lr_scale(self.optimizer.params[name], factor)

    @property
    def xp(self):
        return self.model.xp

    def lr_at(self, step: int) -> float:
        lr = self.schedule.lr_at(step)
        for hook in self.hooks:
            lr = hook.lr_at(self, step, lr)
        return lr

    def batch(self, split: str, rng):
        """The next batch (lowrank.training.batches: the contract), this rank's rows, on the device."""
        batch = as_batch(self.data.batch(split, self.config.batch_size, rng))
        if self.comm.size > 1:
            batch = batch.take(self.rows.start, self.rows.stop)
        return batch.to(self.xp)

    def split_batch(self, batch) -> list:
        """``[(terms_k, args_k)]``: the batch's contiguous row shares, one per shard, each
        with the terms of the loss's mean it holds; a share with none adds nothing."""
        shares = [batch.take(start, stop) for start, stop in self.shards.bounds(batch.num_rows)]
        return [(s.loss_terms, s.args) for s in shares if s.loss_terms > 0]

    def _non_finite(self, loss) -> NonFiniteLossError:
        return NonFiniteLossError(f"loss is {loss} at step {self.step}; stopping (lower --lr, "
                                  "or use --dtype float64); the last good checkpoint is kept")

    def train_step(self) -> dict:
        c, model = self.config, self.model
        start = time.perf_counter()
        loss, tokens = 0.0, 0
        for _ in range(c.accum_steps):
            batch = self.batch("train", self.rng)
            if self.shards is None:
                micro_loss, cache = model.loss(*batch.args)
                if not math.isfinite(micro_loss) and self.grad_sync is None:
                    raise self._non_finite(micro_loss)   # parallel: after the all-reduce
                model.loss_backward(cache, dloss=1.0 / c.accum_steps)
            else:
                micro_loss = self.shards.loss_backward(self.split_batch(batch),
                                                       dloss=1.0 / c.accum_steps)
                if not math.isfinite(micro_loss) and self.grad_sync is None:
                    raise self._non_finite(micro_loss)   # before any update
            loss += micro_loss / c.accum_steps
            tokens += batch.tokens * self.comm.size
        self.tokens_seen += tokens
        if self.grad_sync is not None:
            (loss,) = self.grad_sync.allreduce([loss], self.step)   # the global mean gradient
            if not math.isfinite(loss):
                raise self._non_finite(loss)
        return self.finish_step(loss, start, tokens)

    def finish_step(self, loss: float, start: float, tokens: int | None = None) -> dict:
        """The rest of a step once the gradients are in (``lowrank.app.multi_run`` runs
        the forward/backward of several adapters at once, then this for each): extra_loss →
        clip → AdamW → after_step → zero-grad; returns the step's record."""
        c, model = self.config, self.model
        extra = 0.0   # regularisers (AdaLoRA's orthogonality): reported apart from the loss
        for hook in self.hooks:
            extra += hook.extra_loss(self)
        grad_norm = clip_grad_norm(self.model.parameters(trainable_only=True), c.grad_clip) \
            if c.grad_clip > 0 else float("nan")
        lr = self.lr_at(self.step)
        self.optimizer.step(lr)
        for hook in self.hooks:
            hook.after_step(self)
        model.zero_grad()
        backend.synchronize(self.xp)
        seconds = time.perf_counter() - start
        self.step += 1
        if tokens is None:   # a caller that ran the forward itself reports its own
            tokens = c.accum_steps * c.batch_size * getattr(self.data, "context", 0)
        record = {"step": self.step, "loss": loss, "extra_loss": extra, "lr": lr,
                  "grad_norm": grad_norm,
                  "tokens_per_s": tokens / seconds, "seconds": seconds}
        if self.grad_sync is not None:
            record["allreduce_bytes"] = self.grad_sync.bytes_per_step
            if (self.check_every and self.step % self.check_every == 0
                    or self.step == c.steps):            # and the final model
                self.grad_sync.check_drift(self.step, self._probe())
        return record

    def _probe(self):
        """A fixed token batch (1 row of up to 8 tokens) whose output the drift check compares
        across ranks."""
        cfg = getattr(self.model, "config", None)
        if cfg is None or not hasattr(cfg, "vocab_size"):
            return None
        tokens = backend.host_rng(1234).integers(0, cfg.vocab_size, (1, min(8, cfg.context)))
        return backend.asarray(tokens, xp=self.xp)

    def evaluate(self, data=None, split: str = "val") -> dict:
        """``{"loss": mean loss}`` over ``eval_batches`` fixed batches (dropout off); a task's
        trainer adds its metrics under their names. In parallel each rank scores every K-th
        batch and the sums are all-reduced (a collective: call on all)."""
        data = self.data if data is None else data
        self.model.eval()
        losses = []
        batches = data.eval_batches(split, self.config.batch_size, self.config.eval_batches)
        for i, batch in enumerate(batches):
            if i % self.comm.size == self.comm.rank:
                # [0]: the cache goes at once, not when the next batch's replaces it
                losses.append(self.model.loss(*as_batch(batch).to(self.xp).args)[0])
        self.model.train()
        if self.comm.size == 1:
            return {"loss": float(np.mean(losses))}
        total = self.comm.allreduce_sum(np.array([sum(losses), len(losses)], dtype=np.float64))
        return {"loss": float(total[0] / total[1])}

    def fit(self, on_step=None, progress: bool = True, desc: str = "train") -> list[dict]:
        """Run until ``config.steps``; ``on_step(trainer, record)`` after each (checkpoints)."""
        history = []
        bar = progress_bar(self.config.steps, desc, progress and self.comm.is_root, self.step)
        if self.grad_sync is not None:
            self.grad_sync.check_drift(self.step, self._probe())   # identical start
        while self.step < self.config.steps:
            record = self.train_step()
            if self.config.eval_interval and self.step % self.config.eval_interval == 0:
                record.update({f"val_{k}": v for k, v in self.evaluate().items()})
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if on_step is not None:
                on_step(self, record)
        bar.close()
        return history

    def dropout_states(self) -> dict:
        """The adapters' dropout streams now (host states)."""
        return _dropout_states(self.model)

    def restart_streams(self, dropout_states: dict) -> None:
        """Batch sampling from the seed again and the dropout streams at ``dropout_states``
        (a second run in the same process: RoSA's restart)."""
        self.rng = np.random.Generator(np.random.PCG64(self.config.seed))
        _set_dropout_states(self.model, dropout_states)
        _jump_dropout_streams(self.model, self.comm.rank)

    # --- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "rng": self.rng.bit_generator.state, "optimizer": self.optimizer.state_dict(),
                "dropout_rngs": _dropout_states(self.model),
                "hooks": [h.state_dict() for h in self.hooks]}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.rng.bit_generator.state = state["rng"]
        self.optimizer.load_state_dict(state["optimizer"])
        _set_dropout_states(self.model, state.get("dropout_rngs", {}))
        _jump_dropout_streams(self.model, self.comm.rank)
        for hook, hook_state in zip(self.hooks, state.get("hooks") or []):
            if hook_state is not None:
                hook.load_state_dict(hook_state)


def _dropout_states(model) -> dict:
    return {name: m.dropout_rng_state() for name, m in adapted_modules(model)
            if m.dropout_rng_state() is not None}


def _set_dropout_states(model, states: dict) -> None:
    for name, m in adapted_modules(model):
        if name in states:
            m.set_dropout_rng_state(states[name])


def _jump_dropout_streams(model, rank: int) -> None:
    """Rank r draws its dropout masks from the r-th jump of rank 0's PCG64 stream, so ranks
    drop independently; a checkpoint holds rank 0's states and resume re-derives the others.
    (CuPy generators expose no state: their masks are drawn per rank from the same seed.)"""
    if rank == 0:
        return
    for _, m in adapted_modules(model):
        state = m.dropout_rng_state()
        if state is not None and state.get("bit_generator") == "PCG64":
            stream = np.random.PCG64()
            stream.state = state
            m.set_dropout_rng_state(stream.jumped(rank).state)
