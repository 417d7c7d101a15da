"""Labelled text for classification: the TSV reader, the label map, batches with dynamic padding.

A data file is UTF-8 text, one example a line, ``text<TAB>label``; the label is the field after
the *last* tab, an integer (0, 1, ...) or a name. Integer labels map to themselves; names map
to 0..C-1 in sorted order, and that list of names is saved with the model so evaluation and
prediction speak the same labels (docs/classification.md#data). Host-side code: NumPy only.

The embedded default (``sentiment_split``) is the shipped Yelp + Amazon sentences (in that
order), shuffled with ``numpy.random.default_rng(0)``: the first 200 validate, the other
1,800 train; labels named ``negative`` / ``positive``. The same split is shipped as
``train.tsv`` / ``val.tsv`` (``sentiment:train`` / ``sentiment:val`` on the command line).
Other formats and column options: ``data_files``.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..text.datasets import SENTIMENT_FILES, SENTIMENT_LABELS
from ..training.batches import padded_width
from .data_files import MAX_LABELS, Example, read_examples

VAL_SIZE = 200


def _is_index(label: str) -> bool:
    return label.isascii() and label.isdigit()


def label_names(examples) -> list[str]:
    """The label list a training set defines: ``["0", ..., str(max)]`` when every label is a
    non-negative integer, else the distinct names in sorted order; more than ``MAX_LABELS``
    classes raise ValueError naming the example that goes past the cap."""
    labels = {}
    for e in examples:
        labels.setdefault(e.label, e)
    if all(_is_index(label) for label in labels):
        for label, e in labels.items():
            if int(label) >= MAX_LABELS:   # labels are at most MAX_LABEL_CHARS digits
                raise ValueError(f"{e.source}: label {label} would make {int(label) + 1:,} "
                                 f"classes (a classifier may have at most {MAX_LABELS:,})")
        return [str(i) for i in range(max(int(label) for label in labels) + 1)]
    if len(labels) > MAX_LABELS:
        e = list(labels.values())[MAX_LABELS]
        raise ValueError(f"{e.source}: label {e.label!r} is class number {MAX_LABELS + 1:,} "
                         f"(a classifier may have at most {MAX_LABELS:,})")
    return sorted(labels)


def encode_labels(examples, names) -> np.ndarray:
    """Label indices ``(N,)`` int64; a label outside ``names`` raises ValueError (file:line)."""
    index = {name: i for i, name in enumerate(names)}
    out = np.empty(len(examples), dtype=np.int64)
    for i, e in enumerate(examples):
        key = str(int(e.label)) if _is_index(e.label) else e.label   # "01" means label 1
        if key not in index:
            shown = names if len(names) <= 20 else [*names[:20], f"... ({len(names):,} in all)"]
            raise ValueError(f"{e.source}: unknown label {e.label!r}; the model knows "
                             f"{shown}")
        out[i] = index[key]
    return out


def sentiment_split() -> tuple[list[Example], list[Example]]:
    """``(train 1,800, validation 200)`` of the shipped sentiment sentences."""
    examples = [Example(e.text, SENTIMENT_LABELS[int(e.label)], e.source)
                for path in SENTIMENT_FILES for e in read_examples(path, format="tsv", header=False)]
    order = np.random.default_rng(0).permutation(len(examples))
    val = [examples[i] for i in order[:VAL_SIZE]]
    train = [examples[i] for i in order[VAL_SIZE:]]
    return train, val


class TextBatch:
    """One padded batch: ``ids, mask (B, T)`` int64 (T = the longest row), ``labels (B,)``.
    ``size`` and ``tokens`` count the padded tokens, B·T (what throughput figures count). It
    keeps the trainer's batch contract (lowrank.training.batches): the classifier's loss takes it
    whole."""

    def __init__(self, ids, mask, labels):
        self.ids, self.mask, self.labels = ids, mask, labels

    @property
    def size(self) -> int:
        return int(self.ids.size)

    @property
    def real_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def tokens(self) -> int:
        return self.size

    @property
    def loss_terms(self) -> int:
        return self.num_rows        # the mean over examples

    @property
    def args(self) -> tuple:
        return (self.ids, self.mask, self.labels)   # SequenceClassifier.loss(*args)

    def take(self, start: int, stop: int) -> "TextBatch":
        return self.rows(start, stop)

    def rows(self, start: int, stop: int) -> "TextBatch":
        """Rows ``start:stop`` (views), cut to their own longest row (rows are padded on
        the right, as ``encode_batch`` pads them)."""
        mask = self.mask[start:stop]
        longest = padded_width(mask)
        return TextBatch(self.ids[start:stop, :longest], mask[:, :longest],
                         self.labels[start:stop])

    def to(self, xp) -> "TextBatch":
        """The same batch on ``xp`` (an explicit host -> device move)."""
        return TextBatch(*(backend.asarray(a, xp=xp) for a in (self.ids, self.mask, self.labels)))


class TextData:
    """Tokenized splits (``"train"``, ``"val"``) served in epochs of shuffled batches.

    Every text is tokenized once (``tokenizer.encode_batch(texts, max_length)``: [CLS] … [SEP],
    truncated to ``max_length``); a batch is cut to its own longest row (dynamic padding).
    """

    def __init__(self, arrays: dict, names, max_length: int = 64):
        """``arrays``: split -> ``(ids, mask, labels)`` host arrays (see ``from_examples``)."""
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.names, self.max_length = list(names), max_length
        self.splits = {split: tuple(np.asarray(a, np.int64) for a in arrays[split])
                       for split in arrays}
        self._order, self._pos = None, 0

    @classmethod
    def from_examples(cls, tokenizer, splits: dict, names, max_length: int = 64) -> "TextData":
        """Tokenize ``splits`` (split -> examples) with ``tokenizer.encode_batch``."""
        arrays = {}
        for split, examples in splits.items():
            labels = encode_labels(examples, names)
            ids, mask = tokenizer.encode_batch([e.text for e in examples], max_length=max_length)
            arrays[split] = (ids, mask, labels)
        return cls(arrays, names, max_length)

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def size(self, split: str) -> int:
        return len(self.splits[split][2])

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.size("train") / batch_size)

    def rows(self, split: str, index) -> TextBatch:
        ids, mask, labels = self.splits[split]
        T = max(int(mask[index].sum(axis=1).max()), 1)
        return TextBatch(ids[index, :T], mask[index, :T], labels[index])   # (B, T)

    def batch(self, split: str, batch_size: int, rng) -> TextBatch:
        """The next training batch: epochs of a fresh ``rng`` permutation, the last batch of
        an epoch possibly shorter (PyTorch's DataLoader without drop_last)."""
        n = self.size(split)
        if self._order is None or self._pos >= n:
            self._order, self._pos = rng.permutation(n), 0
        index = self._order[self._pos:self._pos + batch_size]
        self._pos += len(index)
        return self.rows(split, index)

    def eval_batches(self, split: str, batch_size: int):
        """Every example of ``split`` once, in file order."""
        n = self.size(split)
        for start in range(0, n, batch_size):
            yield self.rows(split, np.arange(start, min(start + batch_size, n)))

    def state_dict(self) -> dict:
        return {"order": None if self._order is None else self._order.tolist(), "pos": self._pos}
