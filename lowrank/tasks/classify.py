"""Fine-tune a ``SequenceClassifier``: the recipe, the epoch loop, accuracy and macro-F1.

The recipe (docs/classification.md#recipe): AdamW (lr 5e-4 for adapters, 5e-5 for full
fine-tuning, 1e-3 for the head alone), weight decay 0.01, batch 32, 3 epochs, 10% linear
warm-up then linear decay to 0 (transformers' ``get_linear_schedule_with_warmup``), gradient
clipping at 1.0, seed 0, max 64 tokens, mean pooling, model dropout 0.1; adapters r=8, α=16,
dropout 0.1 on the six linears of every encoder layer.

Training is ``lowrank.training.trainer.Trainer`` itself — AdamW, clipping, every variant's step hook and
the "linear" schedule — over ``TextData``, whose ``TextBatch``es keep the trainer's batch
contract (lowrank.training.batches); a subclass only scores whole splits (accuracy, macro-F1).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from .. import backend
from ..adapters import config as adapter_config, inject
from ..nn.optim import check_adamw_form
from ..nn.schedules import check_schedule
from ..ops.cross_entropy import cross_entropy_forward
from ..training.trainer import Trainer, TrainConfig, hooks_for

MODES = ("adapter", "full", "head")
DEFAULT_LR = {"adapter": 5e-4, "full": 5e-5, "head": 1e-3}
# PEFT names; "output.dense" also ends "attention.output.dense": both are listed for clarity
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
           "output.dense")
ADAPTER_OPTIONS = {"r": 8, "alpha": 16.0, "dropout": 0.1}


@dataclass
class ClassifyConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float | None = None          # None: DEFAULT_LR of the mode
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    max_length: int = 64
    pooling: str = "mean"
    model_dropout: float = 0.1
    seed: int = 0
    schedule: str = "linear"         # SCHEDULES: the recipe's warm-up from 0 + linear decay
    adamw: str | None = None         # ADAMW_FORMS; None: the variant's official one, else torch

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.lr is not None and not float(self.lr) > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("warmup_ratio", "model_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        check_schedule(self.schedule)
        if self.adamw is not None:
            check_adamw_form(self.adamw)
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")

    def lr_for(self, mode: str) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[mode]

    def to_dict(self) -> dict:
        return asdict(self)


def mode_of(variant: str) -> str:
    return variant if variant in ("full", "head") else "adapter"


def prepare(clf, variant: str, options: dict | None = None, targets=TARGETS, seed: int = 0):
    """Make ``clf`` train as ``variant``: "head" (encoder frozen), "full" (everything), or a
    registered adapter variant injected into the encoder under the encoder's own module names
    (the encoder is frozen, the head stays trainable)."""
    if variant == "head":
        clf.freeze()
        return None
    pooler = getattr(clf.encoder, "pooler", None)
    if variant == "full":
        if clf.pooling == "mean" and pooler is not None:
            pooler.freeze()      # unused by mean pooling: no gradient, no weight decay
        return None
    cfg = adapter_config(variant, **{**ADAPTER_OPTIONS, **(options or {})})
    inject(clf.encoder, cfg, targets if isinstance(targets, str) else list(targets), seed=seed)
    return cfg


def warmup_steps(total: int, ratio: float) -> int:
    return math.ceil(total * ratio)   # transformers' TrainingArguments.get_warmup_steps


class ShortRunWarning(UserWarning):
    """A run too short to train: most of its few steps are warm-up."""


MIN_STEPS = 20   # below this a run spends a large share of its steps warming up


def short_run_note(examples: int, config: ClassifyConfig) -> str | None:
    """What to change when ``examples`` make too few steps to leave warm-up (None: enough)."""
    per_epoch = math.ceil(examples / config.batch_size)
    total = per_epoch * config.epochs
    if total >= MIN_STEPS:
        return None
    warm = warmup_steps(total, config.warmup_ratio)
    batch = max(1, min(config.batch_size, 8))
    epochs = max(config.epochs, math.ceil(MIN_STEPS / math.ceil(examples / batch)))
    return (f"only {total} optimizer step(s) ({examples} examples / batch "
            f"{config.batch_size} = {per_epoch} per epoch x {config.epochs} epoch(s)), {warm} "
            f"of them warm-up from learning rate 0: the model will barely move; use more "
            f"epochs, a smaller batch or more data (--epochs {epochs} --batch-size {batch} "
            f"gives {math.ceil(examples / batch) * epochs} steps)")


class ClassifierTrainer(Trainer):
    """``Trainer`` whose evaluation scores whole splits (loss, accuracy, macro-F1)."""

    def evaluate(self, data=None, split: str = "val") -> dict:
        """Loss, accuracy (and macro-F1) over every example of ``split``, dropout off."""
        return evaluate(self.model, self.data if data is None else data, split,
                        self.config.batch_size)


def evaluate(clf, data, split: str = "val", batch_size: int = 32) -> dict:
    was_training = clf.training
    clf.eval()
    losses, preds, labels = [], [], []
    for batch in data.eval_batches(split, batch_size):
        batch = batch.to(clf.xp)
        logits, _ = clf.forward(batch.ids, attention_mask=batch.mask)   # (B, C)
        loss, _ = cross_entropy_forward(logits, batch.labels)
        losses.append(loss * len(batch.labels))
        preds.append(backend.to_numpy(logits.argmax(axis=-1)))
        labels.append(backend.to_numpy(batch.labels))
    clf.train(was_training)
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    return {"loss": float(sum(losses) / len(labels)), **metrics(preds, labels, clf.num_labels)}


def metrics(preds, labels, num_labels: int) -> dict:
    """``accuracy``, ``correct``, ``count``, and ``macro_f1`` when there are more than two
    classes (the unweighted mean over classes of 2TP / (2TP + FP + FN); 0 for a class that is
    neither predicted nor present)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    correct = int((preds == labels).sum())
    out = {"accuracy": correct / max(len(labels), 1), "correct": correct, "count": len(labels)}
    if num_labels > 2:
        f1 = []
        for c in range(num_labels):
            tp = int(((preds == c) & (labels == c)).sum())
            wrong = int(((preds == c) != (labels == c)).sum())   # FP + FN
            f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
        out["macro_f1"] = float(np.mean(f1))
    return out


def train_classifier(clf, data, variant: str, config: ClassifyConfig, on_epoch=None,
                     progress: bool = True, extra_hooks=(), shards: int = 1) -> dict:
    """Train ``clf`` (already ``prepare``d) for ``config.epochs`` epochs, evaluating "val"
    after each and calling ``on_epoch(epoch, record)``. Returns the per-epoch records, train
    tokens/s (padded B·T, docs/performance.md#unpadding), process CPU seconds and the trainer.
    ``extra_hooks`` run after the variant's own; ``shards``: docs/performance.md#batch-shards."""
    per_epoch = data.steps_per_epoch(config.batch_size)
    total = per_epoch * config.epochs
    note = short_run_note(data.size("train"), config)
    if note is not None:
        warnings.warn(note, ShortRunWarning, stacklevel=2)
    lr = config.lr_for(mode_of(variant))
    train = TrainConfig(steps=total, batch_size=config.batch_size, lr=lr, min_lr=0.0,
                        warmup=warmup_steps(total, config.warmup_ratio),
                        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                        seed=config.seed, shards=shards, schedule=config.schedule,
                        adamw=config.adamw)
    trainer = ClassifierTrainer(clf, data, train, hooks=hooks_for(clf) + list(extra_hooks))
    records, history, train_seconds, cpu_seconds = [], [], 0.0, 0.0
    epoch_start = {"t": time.perf_counter(), "cpu": time.process_time()}

    def on_step(tr, record):
        nonlocal train_seconds, cpu_seconds
        history.append(record)
        if tr.step % per_epoch:
            return
        train_seconds += time.perf_counter() - epoch_start["t"]
        cpu_seconds += time.process_time() - epoch_start["cpu"]
        epoch = tr.step // per_epoch
        row = {"epoch": epoch, "step": tr.step,
               "train_loss": float(np.mean([h["loss"] for h in history[-per_epoch:]]))}
        if "val" in data.splits:
            row.update({f"val_{k}": v for k, v in tr.evaluate().items()})
        records.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row, tr)
        epoch_start.update(t=time.perf_counter(), cpu=time.process_time())

    trainer.fit(on_step, progress=progress, desc=variant)
    return {"epochs": records, "history": history, "trainer": trainer,
            "train_seconds": train_seconds, "train_cpu_seconds": cpu_seconds,
            "tokens_per_s": trainer.tokens_seen / train_seconds if train_seconds else float("nan"),
            "steps": total, "lr": lr}
