"""Training text without downloads, and the token stream the trainer samples windows from.

Host-side I/O (docs/conventions.md#host-io): everything here is NumPy on the host; the trainer moves batches to
the device with ``lowrank.backend.asarray``.

Corpora that ship with every CPython, so runs work offline:

* ``docs_corpus()`` — the Python reference documentation topics of ``pydoc_data.topics``
  (what ``help("if")`` prints), about 0.5 MB of English prose with code;
* ``code_corpus()`` — the standard library's own ``.py`` sources, about 2 MB by default.

Both are deterministic for a given Python version (they are what that version ships).
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

CORPORA = ("docs", "code")

# Directories of the stdlib that are not "the library's own source": installed third-party
# packages, the test suites (huge, full of deliberately odd files), caches and bundled wheels.
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
    "_bundled", "__phello__", "lib-dynload",
    "pydoc_data",   # its topics.py *is* the docs corpus
})
# build-specific files (configure paths, compiler flags): they differ between installations
_SKIP_PREFIXES = ("config-", "_sysconfigdata")


# --- corpora -------------------------------------------------------------------------------

def docs_corpus() -> str:
    """The Python documentation topics shipped in ``pydoc_data.topics``, in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:   # some distributions strip pydoc_data
        raise RuntimeError("this Python has no pydoc_data.topics (stripped by the "
                           "distribution?); use the 'code' corpus or your own files") from exc
    return "\n\n".join(topics[key] for key in sorted(topics))


def _stdlib_files(root: Path) -> list[Path]:
    """``.py`` files under ``root``, sorted by their relative POSIX path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS
                       and not d.startswith((".",) + _SKIP_PREFIXES)]
        found += [Path(dirpath) / name for name in filenames
                  if name.endswith(".py") and not name.startswith(_SKIP_PREFIXES)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def code_corpus(max_bytes: int | None = 2_000_000) -> str:
    """The standard library's ``.py`` sources, each preceded by a ``# file: <path>`` line.

    Files are taken in sorted path order, skipping ``site-packages`` and test directories;
    a file that would take the total past ``max_bytes`` (UTF-8 bytes) is skipped, so the
    corpus ends on a file boundary and never exceeds ``max_bytes``. ``None``: no limit.
    Files that are not valid UTF-8 are skipped.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or int(max_bytes) < 1):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise RuntimeError(f"the standard library directory {root} does not exist")
    parts, total = [], 0
    for path in _stdlib_files(root):
        if max_bytes is not None:
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if total + size > max_bytes:   # cheap pre-check before reading
                continue
        try:
            body = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        rel = path.relative_to(root).as_posix()
        piece = f"# file: {rel}\n{body}"
        if not piece.endswith("\n"):
            piece += "\n"
        piece += "\n"
        n = len(piece.encode("utf-8"))
        if max_bytes is not None and total + n > max_bytes:
            continue
        parts.append(piece)
        total += n
    return "".join(parts)


def read_text_files(paths, max_bytes: int | None = None) -> str:
    """The UTF-8 text of the given files, concatenated in the given order (joined by "\\n");
    at most ``max_bytes`` bytes are read in all (streamed: a larger file is cut, never read
    whole, and a character split by the cut is dropped). ``None``: no limit."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no corpus files were given")
    texts, left = [], max_bytes
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"corpus file not found: {path}")
        if not path.is_file():
            raise ValueError(f"corpus path is not a regular file: {path}")
        if left is not None and left <= 0:
            break
        try:
            with open(path, "rb") as fh:
                raw = fh.read() if left is None else fh.read(left)
                cut = left is not None and len(raw) == left and fh.read(1) != b""
        except OSError as exc:
            raise ValueError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
        try:
            texts.append(_decode(raw, cut))
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus file {path} is not UTF-8 text: {exc}") from None
        if left is not None:
            left -= len(raw) + 1   # the joining newline counts too
    return "\n".join(texts)


def _decode(raw: bytes, cut: bool) -> str:
    """UTF-8 text of ``raw``; when the file was ``cut``, a character split at the end is
    dropped rather than refused."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    return decoder.decode(raw, final=not cut)


def corpus(name_or_paths, *, max_bytes: int | None = 2_000_000) -> str:
    """``"docs"``, ``"code"`` or files (a path or a list of paths; both capped at
    ``max_bytes``)."""
    if isinstance(name_or_paths, str):
        if name_or_paths == "docs":
            return docs_corpus()
        if name_or_paths == "code":
            return code_corpus(max_bytes)
        if Path(name_or_paths).exists():
            return read_text_files([name_or_paths], max_bytes)
        raise ValueError(f"unknown corpus {name_or_paths!r}: give one of {CORPORA} or the "
                         "path of a UTF-8 text file")
    if isinstance(name_or_paths, os.PathLike):
        return read_text_files([name_or_paths], max_bytes)
    if isinstance(name_or_paths, (list, tuple)):
        return read_text_files(name_or_paths, max_bytes)
    raise ValueError(f"corpus must be a name in {CORPORA}, a path or a list of paths, got "
                     f"{type(name_or_paths).__name__}")


# --- the token stream ---------------------------------------------------------------------------

SPLITS = ("train", "val")
_TARGET_CHUNKS = 100   # the stream is cut into about this many chunks (more if they'd be huge)
_MAX_CHUNK_WINDOWS = 64  # ... but no chunk longer than this many context windows


class TokenData:
    """A token stream split into train and validation, sampled as ``(x, y)`` windows.

    The split works on contiguous chunks: the stream is cut into chunks of at least
    ``context + 1`` tokens, and a deterministic, evenly spaced ``val_fraction`` of the chunks
    is validation. Each split is a list of contiguous *segments* (runs of adjacent chunks of
    the same split) and every window ``ids[i : i + context + 1]`` lies inside one segment.
    So no window ever straddles a boundary: no validation token is ever an input or a target
    of a training window, and vice versa. Spreading the validation chunks over the whole
    stream (rather than taking the tail) keeps both splits from the same mix of documents
    even though the corpora are ordered (sorted topics, sorted file paths).
    """

    def __init__(self, ids, context: int, val_fraction: float = 0.1):
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        if isinstance(context, bool) or int(context) != context or context < 1:
            raise ValueError(f"context must be an integer >= 1, got {context!r}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        context, val_fraction = int(context), float(val_fraction)
        n = int(ids.size)
        if n == 0:
            raise ValueError("the corpus is empty: no tokens to train on")
        if ids.min() < 0:
            raise ValueError(f"token ids must be >= 0, got {ids.min()}")
        window = context + 1
        need = window * (2 if val_fraction > 0 else 1)
        if n < need:
            raise ValueError(
                f"the corpus is too small: {n} tokens, but context={context} needs at least "
                f"{window} tokens per split ({need} in all with val_fraction={val_fraction}); "
                "use more text or a shorter context")
        self.ids = ids
        self.context = context
        self.val_fraction = val_fraction

        # chunks: at least one window each, about _TARGET_CHUNKS of them
        chunk_len = max(window, min(n // _TARGET_CHUNKS, _MAX_CHUNK_WINDOWS * window))
        n_chunks = n // chunk_len             # the remainder joins the last chunk
        starts = np.arange(n_chunks, dtype=np.int64) * chunk_len
        ends = np.append(starts[1:], n)
        is_val = np.zeros(n_chunks, dtype=bool)
        if val_fraction > 0:
            n_val = min(max(1, round(val_fraction * n_chunks)), n_chunks - 1)
            # evenly spaced, centred in their strides: chunk floor((k + 1/2) n_chunks / n_val)
            is_val[((np.arange(n_val) + 0.5) * n_chunks / n_val).astype(np.int64)] = True
        self._segments = {}
        for split, mask in (("train", ~is_val), ("val", is_val)):
            segs = []
            for i in np.flatnonzero(mask):
                if segs and segs[-1][1] == starts[i]:
                    segs[-1][1] = int(ends[i])   # adjacent chunk of the same split: extend
                else:
                    segs.append([int(starts[i]), int(ends[i])])
            self._segments[split] = np.asarray(segs, dtype=np.int64).reshape(-1, 2)
        for split in SPLITS if val_fraction > 0 else ("train",):
            if self.num_tokens(split) < window:   # cannot happen with the sizes above
                raise ValueError(f"the {split} split has {self.num_tokens(split)} tokens, "
                                 f"fewer than context + 1 = {window}")
        # windows per segment, and their running total, for uniform sampling over windows
        self._counts = {s: np.maximum(seg[:, 1] - seg[:, 0] - context, 0)
                        for s, seg in self._segments.items()}
        self._cum = {s: np.cumsum(c) for s, c in self._counts.items()}

    # --- sizes ---------------------------------------------------------------------------
    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "val" and self.val_fraction == 0:
            raise ValueError("there is no validation split (val_fraction=0)")

    def segments(self, split: str) -> np.ndarray:
        """``(k, 2)`` half-open ``[start, end)`` token ranges of ``split``."""
        self._check_split(split)
        return self._segments[split].copy()

    def num_tokens(self, split: str) -> int:
        seg = self._segments[split]
        return int((seg[:, 1] - seg[:, 0]).sum())

    def num_windows(self, split: str) -> int:
        """How many distinct training windows (start positions) ``split`` has."""
        self._check_split(split)
        return int(self._counts[split].sum())

    def __repr__(self):
        return (f"TokenData({self.ids.size} tokens, context={self.context}, "
                f"train={self.num_tokens('train')}, val={self.num_tokens('val')})")

    # --- sampling -----------------------------------------------------------------------------
    def _windows(self, starts) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.context + 1)
        tokens = self.ids[offsets].astype(np.int64)
        return tokens[:, :-1], tokens[:, 1:]

    def batch(self, split: str, batch_size: int, rng) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` int64 ``(batch_size, context)`` host arrays, ``y`` = ``x`` shifted by one.

        Window starts are uniform over all windows of ``split``; ``rng`` is a
        ``numpy.random.Generator`` (its state alone decides the batch, so resuming is exact).
        """
        self._check_split(split)
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        cum = self._cum[split]
        draw = rng.integers(0, int(cum[-1]), size=int(batch_size))
        seg = np.searchsorted(cum, draw, side="right")
        before = np.concatenate([[0], cum[:-1]])[seg]
        return self._windows(self._segments[split][seg, 0] + (draw - before))

    def eval_starts(self, split: str) -> np.ndarray:
        """Start positions of the non-overlapping windows (stride ``context``) ``eval_batches``
        walks through, segment by segment: every target token is scored at most once."""
        self._check_split(split)
        out = [np.arange(a, b - self.context, self.context, dtype=np.int64)
               for a, b in self._segments[split]]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def eval_batches(self, split: str, batch_size: int, max_batches: int | None = None):
        """Deterministic ``(x, y)`` batches over ``split`` (the last one may be smaller);
        at most ``max_batches`` of them (``None``: all). Argument errors raise at the call."""
        self._check_split(split)
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if max_batches is not None and int(max_batches) < 0:
            raise ValueError(f"max_batches must be >= 0 or None, got {max_batches!r}")
        batch_size = int(batch_size)
        starts = self.eval_starts(split)
        n_batches = -(-len(starts) // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, int(max_batches))
        return (self._windows(starts[b * batch_size:(b + 1) * batch_size])
                for b in range(n_batches))


__all__ = ["CORPORA", "SPLITS", "docs_corpus", "code_corpus", "read_text_files", "corpus",
           "TokenData"]
