"""Instruction-tune a chat model (the Llama family): the recipe, the loop, loss, perplexity and
exact-match accuracy of the greedy answer (docs/chat.md).

The recipe (docs/chat.md#recipe): AdamW lr 2e-4, no weight decay, batch 8, 1 epoch (``steps``
caps it), 10% linear warm-up then linear decay to 0, gradient clipping at 1.0, seed 0,
max 512 tokens; adapters r=8, α=16, dropout 0.05 on every linear of every decoder layer
(``all-linear``: q/k/v/o and gate/up/down, never the head). The loss is the mean
cross-entropy of the assistant's tokens only, the head computed only there
(lowrank.models.labelled_loss).

Training is ``lowrank.training.trainer.Trainer`` itself over ``ChatData``, whose
``ChatBatch``es keep the trainer's batch contract.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..adapters import config as adapter_config, inject
from ..adapters.inject import ALL_LINEAR
from ..models.decode import greedy_batch, stream
from ..models.labelled_loss import labelled_loss_value
from ..nn.optim import check_adamw_form
from ..nn.schedules import check_schedule
from ..quant import quantize_base
from ..training.trainer import Trainer, TrainConfig, hooks_for
from .chat_data import ChatData

ADAPTER_OPTIONS = {"r": 8, "alpha": 16.0, "dropout": 0.05}
TARGETS = ALL_LINEAR


@dataclass
class ChatConfig:
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    max_length: int = 512
    seed: int = 0
    steps: int | None = None          # a cap on the optimizer steps of all epochs
    schedule: str = "linear"
    adamw: str | None = None
    loraplus_lr_ratio: float | None = None
    max_new_tokens: int = 32          # the greedy answer scored by accuracy
    shards: int = 1                   # batch shards on threads (docs/performance.md#batch-shards)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length", "max_new_tokens", "shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool)
                                       or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.warmup_ratio) < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.loraplus_lr_ratio is not None and not float(self.loraplus_lr_ratio) > 0:
            raise ValueError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio!r}")
        check_schedule(self.schedule)
        if self.adamw is not None:
            check_adamw_form(self.adamw)

    def total_steps(self, steps_per_epoch: int) -> int:
        total = steps_per_epoch * self.epochs
        return total if self.steps is None else min(total, self.steps)

    def to_dict(self) -> dict:
        return asdict(self)


def prepare(model, variant: str, options: dict | None = None, targets=TARGETS, seed: int = 0,
            quantize: str | None = None):
    """Inject ``variant`` (registered adapter) into ``model``'s linears (the base frozen);
    ``quantize``: "keep" leaves a GGUF base in its own blocks under the adapters
    (docs/gguf.md#kept-quantized), "nf4" stores it in 4-bit NormalFloat (QLoRA)."""
    cfg = adapter_config(variant, **{**ADAPTER_OPTIONS, **(options or {})})
    inject(model, cfg, targets if isinstance(targets, str) else list(targets), seed=seed)
    if quantize:
        quantize_base(model, quantize)
    return cfg


def train_config(config: ChatConfig, total: int) -> TrainConfig:
    return TrainConfig(steps=total, batch_size=config.batch_size, lr=float(config.lr),
                       min_lr=0.0, warmup=math.ceil(total * config.warmup_ratio),
                       weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                       seed=config.seed, schedule=config.schedule, adamw=config.adamw,
                       loraplus_lr_ratio=config.loraplus_lr_ratio, shards=config.shards)


def make_trainer(model, data: ChatData, config: ChatConfig, extra_hooks=()) -> Trainer:
    total = config.total_steps(data.steps_per_epoch(config.batch_size))
    return Trainer(model, data, train_config(config, total),
                   hooks=hooks_for(model) + list(extra_hooks))


def train_chat(model, data: ChatData, config: ChatConfig, trainer: Trainer | None = None,
               on_step=None, on_epoch=None, progress: bool = True) -> dict:
    """Train until the config's steps (a ``trainer`` restored from a checkpoint continues);
    ``on_step(trainer, record)`` after each step, ``on_epoch(epoch, row, trainer)`` after each
    epoch (and after the last step). Returns the history and train tokens/s (the batches'
    padded tokens B·T over the training wall time, evaluation excluded)."""
    trainer = trainer or make_trainer(model, data, config)
    per_epoch = data.steps_per_epoch(config.batch_size)
    history, seconds = [], [0.0]
    tokens0, clock = trainer.tokens_seen, [time.perf_counter()]

    def step(tr, record):
        history.append(record)
        if on_step is not None:
            on_step(tr, record)
        if tr.step % per_epoch and tr.step != tr.config.steps:
            return
        seconds[0] += time.perf_counter() - clock[0]
        recent = history[-per_epoch:]
        row = {"epoch": math.ceil(tr.step / per_epoch), "step": tr.step,
               "train_loss": float(np.mean([h["loss"] for h in recent]))}
        if on_epoch is not None:
            on_epoch(row["epoch"], row, tr)
        clock[0] = time.perf_counter()

    trainer.fit(step, progress=progress, desc="chat")
    tokens = trainer.tokens_seen - tokens0
    return {"history": history, "trainer": trainer, "train_seconds": seconds[0],
            "tokens_per_s": tokens / seconds[0] if seconds[0] else float("nan"),
            "steps": trainer.config.steps}


# --- metrics ---------------------------------------------------------------------------------

def evaluate_loss(model, data: ChatData, split: str = "val", batch_size: int = 8) -> dict:
    """Mean cross-entropy over every labelled token of ``split`` and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in data.eval_batches(split, batch_size):
            n = batch.labels
            loss = labelled_loss_value(model, *batch.to(model.xp).args)
            total, count = total + loss * n, count + n
    finally:
        model.train(was_training)
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": count}


def split_for_answer(messages) -> tuple[list, str]:
    """``(prompt messages, reference)``: everything before the last assistant turn, its text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return list(messages[:last]), messages[last]["content"]


def answer_prompt(model, tokenizer, template, messages, max_new_tokens: int) -> list[int]:
    """The ids the reply continues: ``messages`` rendered with the generation prompt. A prompt
    longer than the context allows keeps its last tokens (the question and the assistant's
    header)."""
    ids = template.encode(tokenizer, messages, add_generation_prompt=True).tolist()
    return ids[-(model.config.max_position_embeddings - max_new_tokens + 1):]


def _reply(tokenizer, tokens, stop) -> str:
    out = [t for t in tokens if t not in stop]          # the end-of-turn token dropped
    return tokenizer.decode(np.asarray(out, dtype=np.int64)) if out else ""


def greedy_answer(model, tokenizer, template, messages, max_new_tokens: int = 32) -> str:
    """The model's greedy reply to ``messages`` (KV cache; the end-of-turn token dropped)."""
    stop = template.stop_ids(tokenizer)
    ids = answer_prompt(model, tokenizer, template, messages, max_new_tokens)
    return _reply(tokenizer, stream(model, ids, max_new_tokens, stop_ids=stop), stop)


def greedy_answers(model, tokenizer, template, conversations, max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str]:
    """``greedy_answer`` of each conversation, ``batch_size`` prompts of similar length decoded
    together (``decode.greedy_batch``: one product per layer for the batch)."""
    stop = template.stop_ids(tokenizer)
    prompts = [answer_prompt(model, tokenizer, template, m, max_new_tokens)
               for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # little padding
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, tokens in zip(chunk, greedy_batch(model, [prompts[i] for i in chunk],
                                                 max_new_tokens, stop)):
            answers[i] = _reply(tokenizer, tokens, stop)
    return answers


def evaluate_accuracy(model, tokenizer, template, conversations, max_new_tokens: int = 32,
                      on_answer=None, batch_size: int = 16) -> dict:
    """Exact match of the greedy answer (stripped) against each conversation's last assistant
    turn (stripped): ``accuracy``, ``correct``, ``count``. Answers are decoded ``batch_size``
    at a time (``greedy_answers``)."""
    pairs = [split_for_answer(messages) for messages in conversations]
    answers = greedy_answers(model, tokenizer, template, [p for p, _ in pairs], max_new_tokens,
                             batch_size)
    correct = 0
    for k, (answer, (_, reference)) in enumerate(zip(answers, pairs)):
        hit = answer.strip() == reference.strip()
        correct += hit
        if on_answer is not None:
            on_answer(k, answer, reference, hit)
    n = len(conversations)
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "count": n}


__all__ = ["ADAPTER_OPTIONS", "ChatConfig", "TARGETS", "answer_prompt", "evaluate_accuracy",
           "evaluate_loss", "greedy_answer", "greedy_answers", "make_trainer", "prepare",
           "split_for_answer", "train_chat", "train_config"]
