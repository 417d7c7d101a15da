"""Conversations for instruction tuning (docs/chat.md#data): JSONL files, the chat template,
labels on the assistant's turns only, padded batches.

A line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` or
``{"prompt": str, "completion": str}`` (one user turn, one assistant turn). A conversation is
rendered with the model's own template and tokenized once. The tokens of an assistant turn
are found by rendering prefixes of the conversation and comparing token ids (no guess about
the template's markup): the turn starts after ``render(messages[:i], add_generation_prompt)``
and ends at its end-of-turn token (included; what follows it, e.g. a newline, is not the
assistant's), as TRL's assistant-only loss labels it. Every other position gets the target
``IGNORE``. ``max_length`` cuts a conversation's tokens; each turn it cuts is counted.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import backend
from ..models.labelled_loss import IGNORE
from ..training.batches import padded_width

ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 1 << 22   # a line of a few MB is not a conversation


# --- files ----------------------------------------------------------------------------------

def check_conversation(obj, where: str) -> list[dict]:
    """The messages of one JSONL record (either shape), or ``ValueError`` naming ``where``."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{k}] must be {{'role': one of {ROLES}, "
                                 "'content': a string}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in obj or "completion" in obj:
        for name in ("prompt", "completion"):
            if not isinstance(obj.get(name), str):
                raise ValueError(f"{where}: '{name}' must be a string")
        messages = [{"role": "user", "content": obj["prompt"]},
                    {"role": "assistant", "content": obj["completion"]}]
    else:
        raise ValueError(f"{where}: a line needs 'messages' or 'prompt' and 'completion'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant turn (nothing to learn from)")
    return messages


def read_jsonl(path) -> list[list[dict]]:
    """Every conversation of a JSONL file; the first bad line raises one ``ValueError``
    naming ``file:line`` (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    conversations = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            conversations.append(check_conversation(obj, where))
    if not conversations:
        raise ValueError(f"{path}: no conversation in the file")
    return conversations


# --- rendering and labels ----------------------------------------------------------------------

@dataclass
class CutReport:
    """What ``max_length`` cut: turns (of any role) and assistant turns, conversations left
    with no label at all (dropped from training)."""
    turns_cut: int = 0
    assistant_turns_cut: int = 0
    conversations_dropped: int = 0
    details: list = field(default_factory=list)   # "conversation k, turn i (role)"

    def line(self, split: str) -> str:
        return (f"{split}: --max-length cut {self.turns_cut} turn(s) "
                f"({self.assistant_turns_cut} of the assistant); "
                f"{self.conversations_dropped} conversation(s) left without a label dropped")


def _token_prefix(full, part, where: str) -> int:
    """``len(part)`` when ``part`` is a token prefix of ``full``, else where they first differ
    (a template whose pieces tokenize differently alone: the label starts no later)."""
    n = min(len(full), len(part))
    diff = np.nonzero(full[:n] != part[:n])[0]
    return int(diff[0]) if diff.size else len(part)


def encode_conversation(template, tokenizer, messages, stop_ids, where: str = "conversation"):
    """``(ids (L,), labelled (L,) bool, turns [(start, end, role)])``: the rendered ids; which
    tokens belong to an assistant turn (its end-of-turn token included); each turn's span."""
    full = np.asarray(template.encode(tokenizer, messages), dtype=np.int64)
    labelled = np.zeros(full.shape, dtype=bool)
    turns, start = [], 0
    for i, m in enumerate(messages):
        end = _token_prefix(full, template.encode(tokenizer, messages[:i + 1]), where)
        if m["role"] == "assistant":
            opened = template.encode(tokenizer, messages[:i], add_generation_prompt=True)
            a = _token_prefix(full, opened, where)
            stops = [k for k in range(a, end) if int(full[k]) in stop_ids]
            b = stops[-1] + 1 if stops else end      # through the end-of-turn token
            labelled[a:b] = True
        turns.append((start, end, m["role"]))
        start = end
    return full, labelled, turns


def encode_conversations(template, tokenizer, conversations, max_length: int,
                         where: str = "data"):
    """``(rows, report)``: each row ``(ids, targets)`` int64 of one conversation cut to
    ``max_length`` tokens, ``targets[t] = ids[t+1]`` where token t+1 is the assistant's, else
    ``IGNORE``; conversations left with no label are dropped and counted."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    stop_ids = set(template.stop_ids(tokenizer))
    rows, report = [], CutReport()
    for k, messages in enumerate(conversations):
        ids, labelled, turns = encode_conversation(template, tokenizer, messages, stop_ids,
                                                   f"{where}: conversation {k}")
        for i, (start, end, role) in enumerate(turns):
            if end > max_length:
                report.turns_cut += 1
                report.assistant_turns_cut += role == "assistant"
                report.details.append(f"conversation {k}, turn {i} ({role})")
        ids, labelled = ids[:max_length], labelled[:max_length]
        targets = np.full(ids.shape, IGNORE, dtype=np.int64)
        targets[:-1] = np.where(labelled[1:], ids[1:], IGNORE)   # predict token t+1 at t
        if not (targets >= 0).any():
            report.conversations_dropped += 1
            continue
        rows.append((ids, targets))
    return rows, report


# --- batches ---------------------------------------------------------------------------------

class ChatBatch:
    """Conversations padded on the right to the batch's longest: ``ids, targets (B, T)`` int64,
    ``mask (B, T)`` int8 (1 token, 0 padding). The trainer's batch contract
    (lowrank.training.batches): ``model.loss(ids, targets, mask)``; ``tokens`` is B·T."""

    def __init__(self, ids, targets, mask):
        self.ids, self.targets, self.mask = ids, targets, mask

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.ids.size)

    @property
    def labels(self) -> int:
        return int((self.targets >= 0).sum())

    @property
    def loss_terms(self) -> int:
        return self.labels          # the mean over the assistant's tokens

    @property
    def args(self) -> tuple:
        return (self.ids, self.targets, self.mask)

    def take(self, start: int, stop: int) -> "ChatBatch":
        """Rows ``start:stop`` (views), cut to their own longest row (rows are padded on the
        right): a batch shard computes no column that is padding in all of its rows."""
        mask = self.mask[start:stop]
        longest = padded_width(mask)
        return ChatBatch(self.ids[start:stop, :longest], self.targets[start:stop, :longest],
                         mask[:, :longest])

    def to(self, xp) -> "ChatBatch":
        return ChatBatch(*(backend.asarray(a, xp=xp) for a in self.args))


def pad_rows(rows, pad_id: int) -> ChatBatch:
    """Host ``ChatBatch`` of ``[(ids, targets)]`` padded to the longest."""
    T = max(len(ids) for ids, _ in rows)
    B = len(rows)
    ids = np.full((B, T), int(pad_id), dtype=np.int64)
    targets = np.full((B, T), IGNORE, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int8)
    for b, (i, t) in enumerate(rows):
        ids[b, :len(i)], targets[b, :len(t)], mask[b, :len(i)] = i, t, 1
    return ChatBatch(ids, targets, mask)


class ChatData:
    """Encoded splits served in epochs of shuffled batches (as ``TextData``: a fresh ``rng``
    permutation per epoch, the last batch possibly shorter); ``eval_batches`` in file order."""

    def __init__(self, splits: dict, pad_id: int, reports: dict | None = None):
        self.splits = {name: list(rows) for name, rows in splits.items()}
        self.pad_id = int(pad_id)
        self.reports = dict(reports or {})
        for name, rows in self.splits.items():
            if not rows:
                raise ValueError(f"{name}: no conversation keeps a label within max_length")
        self._order, self._pos = None, 0

    @classmethod
    def from_conversations(cls, template, tokenizer, splits: dict, max_length: int):
        encoded, reports = {}, {}
        for name, conversations in splits.items():
            encoded[name], reports[name] = encode_conversations(
                template, tokenizer, conversations, max_length, name)
        return cls(encoded, tokenizer.pad_id, reports)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.size("train") / batch_size)

    def rows(self, split: str, index) -> ChatBatch:
        return pad_rows([self.splits[split][int(i)] for i in index], self.pad_id)

    def batch(self, split: str, batch_size: int, rng) -> ChatBatch:
        n = self.size(split)
        if self._order is None or self._pos >= n:
            self._order, self._pos = rng.permutation(n), 0
        index = self._order[self._pos:self._pos + batch_size]
        self._pos += len(index)
        return self.rows(split, index)

    def eval_batches(self, split: str, batch_size: int, limit: int | None = None):
        n = self.size(split)
        for k, start in enumerate(range(0, n, batch_size)):
            if limit is not None and k >= limit:
                return
            yield self.rows(split, np.arange(start, min(start + batch_size, n)))

    def state_dict(self) -> dict:
        return {"order": None if self._order is None else self._order.tolist(), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        order = state.get("order")
        self._order = None if order is None else np.asarray(order, dtype=np.int64)
        self._pos = int(state.get("pos", 0))


__all__ = ["ChatBatch", "ChatData", "CutReport", "IGNORE", "check_conversation",
           "encode_conversation", "encode_conversations", "pad_rows", "read_jsonl"]
