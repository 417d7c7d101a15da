"""Byte-level BPE (GPT-2 style) trained with the Hugging Face ``tokenizers`` library.

Byte-level means the base alphabet is the 256 byte values (``ByteLevel.alphabet()``), so any
text encodes without an unknown token and ``decode(encode(t)) == t`` for every string.
Training is deterministic: the same text and vocabulary size give the same merges.

Host-side I/O: ids come back as host ``numpy`` arrays (``int32``); move them with
``lowrank.backend.asarray`` when a device needs them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .storage import atomic_write

TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = 256          # the byte alphabet; merges come on top of it
_TRAIN_CHUNK_CHARS = 1 << 16   # training text is fed in pieces of about this size ...
_ENCODE_CHUNK_CHARS = 1 << 18  # ... and long texts are encoded in pieces, in parallel


def _safe_chunks(text: str, size: int):
    """Pieces of ``text`` of at most about ``size`` characters that concatenate to ``text``.

    Each cut is placed just before a newline that follows a non-whitespace character. The
    byte-level pre-tokenizer (GPT-2 regex) always splits there: no pre-token holds a
    non-whitespace character followed by whitespace, and no pre-token that ends in a
    non-whitespace character looks ahead. BPE never merges across pre-tokens, so encoding the
    pieces gives exactly the ids of encoding the whole text, and training on them counts
    exactly the same words. A piece with no such place is left whole (longer than ``size``).
    """
    start, n = 0, len(text)
    while start < n:
        end = n
        if n - start > size:
            cut = text.rfind("\n", start + 1, start + size)
            while cut > start and text[cut - 1].isspace():
                cut = text.rfind("\n", start + 1, cut)
            if cut <= start:   # none in the window: look further on
                cut = start + size
                while True:
                    cut = text.find("\n", cut)
                    if cut < 0 or not text[cut - 1].isspace():
                        break
                    cut += 1
            end = n if cut < 0 else cut
        yield text[start:end]
        start = end


class Tokenizer:
    """A trained byte-level BPE tokenizer: ``encode``, ``decode``, ``save``, ``load``."""

    def __init__(self, hf_tokenizer: _HFTokenizer):
        self._tok = hf_tokenizer

    # --- properties ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def hf(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def get_vocab(self) -> dict[str, int]:
        return dict(self._tok.get_vocab(with_added_tokens=True))

    def merges(self) -> list:
        """The learned merges in order (from the serialized model)."""
        return json.loads(self._tok.to_str())["model"]["merges"]

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(int(i))

    # --- encode / decode ------------------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D ``int32`` host array."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        try:
            if len(text) <= _ENCODE_CHUNK_CHARS:
                ids = self._tok.encode(text, add_special_tokens=False).ids
                return np.asarray(ids, dtype=np.int32)
            # pieces cut where the pre-tokenizer splits anyway: the same ids, in parallel
            pieces = list(_safe_chunks(text, _ENCODE_CHUNK_CHARS))
            encodings = self._tok.encode_batch(pieces, add_special_tokens=False)
        except TypeError:
            text.encode("utf-8")   # a lone surrogate: raises UnicodeEncodeError, which says so
            raise
        return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])

    def decode(self, ids) -> str:
        """Text of a sequence of ids (list, host array, or any backend array)."""
        if hasattr(ids, "shape") and not isinstance(ids, np.ndarray):
            from .backend import to_numpy
            ids = to_numpy(ids)
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode() needs a 1-D sequence of ids, got shape {ids.shape}")
        if ids.size and (not np.issubdtype(ids.dtype, np.integer)
                         or ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be integers in [0, {self.vocab_size}), got dtype "
                             f"{ids.dtype} range [{ids.min()}, {ids.max()}]")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self):
        return f"Tokenizer(byte-level BPE, vocab_size={self.vocab_size})"

    # --- persistence --------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write ``tokenizer.json`` atomically; ``path`` is the file or a directory for it."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self._tok.to_str(pretty=False).encode("utf-8"))
        return path

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a ``tokenizer.json`` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as exc:
            raise ValueError(f"cannot read tokenizer file {path}: {type(exc).__name__}: {exc}") from exc
        return cls(tok)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on ``text``: 256 byte tokens plus ``vocab_size - 256`` merges.

    The vocabulary may come out smaller than ``vocab_size`` when the text has fewer distinct
    pairs to merge. Same text and ``vocab_size`` → the same tokenizer.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (the byte "
                         f"alphabet), got {vocab_size!r}")
    if not isinstance(text, str) or not text:
        raise ValueError("cannot train a tokenizer on empty text")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_safe_chunks(text, _TRAIN_CHUNK_CHARS), trainer=trainer)
    return Tokenizer(tok)


__all__ = ["Tokenizer", "train_tokenizer", "TOKENIZER_FILE", "MIN_VOCAB_SIZE"]
