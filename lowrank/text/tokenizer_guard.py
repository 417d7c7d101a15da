"""A ``tokenizer.json`` read as untrusted input (docs/pretrained.md#tokenizer).

The Rust ``tokenizers`` library trusts its file: a catastrophic regex in a ``Split``
pre-tokenizer or a ``Replace`` normalizer panics at encode time (``PanicException: Onig:
retry-limit-in-match over``), a WordPiece vocabulary without its unknown token fails on the
first unknown word, a BPE model with millions of merges takes the memory of millions of merges.
So:

* ``check_spec`` bounds the file before the library sees it: its size, the vocabulary,
  merges (no more than the vocabulary has tokens; each a pair of tokens it holds), added
  tokens, and the length of every regex; a WordPiece model must hold its unknown token.
* ``library_call`` wraps every call into the library (construction, encode, decode): any
  failure, pyo3's ``PanicException`` included (a ``BaseException``), becomes one ValueError
  naming the file; the panic's own report, which Rust writes to the process's stderr, is
  kept off the terminal (and replayed there when nothing failed).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

MAX_TOKENIZER_BYTES = 256 << 20
MAX_VOCAB = 1 << 22
MAX_ADDED_TOKENS = 1 << 16
MAX_REGEX_CHARS = 4096
MODELS = ("BPE", "WordPiece", "WordLevel", "Unigram")


def check_spec(spec, source) -> None:
    """Refuse a parsed ``tokenizer.json`` whose sizes or model the library cannot be trusted
    with; one ValueError naming ``source`` and the field."""
    def fail(field, text):
        raise ValueError(f"tokenizer file {source}: field {field!r} {text}")
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ValueError(f"tokenizer file {source} is not a tokenizer.json (no 'model' object)")
    model = spec["model"]
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind not in MODELS:
        fail("model.type", f"must be one of {MODELS}, got {kind!r}")
    vocab = model.get("vocab")
    if not isinstance(vocab, (dict, list)) or len(vocab) > MAX_VOCAB:
        fail("model.vocab", f"must be a vocabulary of at most {MAX_VOCAB:,} tokens")
    if kind == "BPE":
        _check_merges(model.get("merges", []), vocab, fail)
    if kind in ("WordPiece", "WordLevel"):
        unk = model.get("unk_token")
        if not isinstance(unk, str) or not isinstance(vocab, dict) or unk not in vocab:
            fail("model.unk_token", f"= {unk!r} is not in the vocabulary (the library fails on "
                                    "the first word it does not know)")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list) or len(added) > MAX_ADDED_TOKENS:
        fail("added_tokens", f"must be a list of at most {MAX_ADDED_TOKENS:,} tokens")
    for field, pattern in _regexes(spec, ""):
        if not isinstance(pattern, str) or len(pattern) > MAX_REGEX_CHARS:
            fail(field, f"must be a regex of at most {MAX_REGEX_CHARS:,} characters")


def _check_merges(merges, vocab, fail) -> None:
    if not isinstance(merges, list) or not isinstance(vocab, dict):
        fail("model.merges", "must be a list (and model.vocab an object)")
    if len(merges) > len(vocab):   # each merge makes one token of the vocabulary
        fail("model.merges", f"holds {len(merges):,} merges for a vocabulary of {len(vocab):,} "
                             "tokens (each merge makes one token)")
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(p, str) and p and p in vocab for p in pair)):
            fail(f"model.merges[{i}]", f"= {str(merge)[:80]!r} is not a pair of tokens of the "
                                       "vocabulary")


def _regexes(obj, path):
    """``(field, pattern)`` of every ``{"Regex": pattern}`` in the spec (normalizers,
    pre-tokenizers, their sequences)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{path}.{k}" if path else k
            if k == "Regex":
                yield here, v
            elif k not in ("vocab", "merges", "added_tokens"):
                yield from _regexes(v, here)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _regexes(v, f"{path}[{i}]")


@contextlib.contextmanager
def library_call(source, doing: str):
    """Run a call into ``tokenizers``; its failure -> one ValueError naming ``source``."""
    with _stderr_kept() as kept:
        try:
            yield
        except (KeyboardInterrupt, SystemExit, TypeError, UnicodeError):
            raise   # the caller's own errors (a non-str input) say what they are
        except BaseException as exc:   # pyo3's PanicException is not an Exception
            kept.discard = True
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"tokenizer {source}: the tokenizers library failed while "
                             f"{doing}: {type(exc).__name__}: {text[:200]}") from None


class _Kept:
    discard = False


@contextlib.contextmanager
def _stderr_kept():
    """File descriptor 2 goes to a temporary file for the duration; what was written there is
    copied back unless ``discard`` was set (a panic's report, told in one line instead)."""
    kept = _Kept()
    try:
        saved = os.dup(2)
    except OSError:   # no stderr at all: nothing to keep off it
        yield kept
        return
    with tempfile.TemporaryFile() as tmp:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            yield kept
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not kept.discard and tmp.tell():
                tmp.seek(0)
                os.write(2, tmp.read(1 << 16))
