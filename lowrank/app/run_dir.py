"""A run's directory (docs/training.md#checkpoints): whose it is, what may be written into it,
and the files beside the checkpoint (``run.json``, ``tokenizer.json``) read as untrusted input.

* Writing into a directory that holds another run needs ``resume`` (continue it) or ``force``
  (replace it); a fine-tune never writes into its own base.
* ``run.json`` carries an integrity record (``storage.seal``) and the SHA-256 of the
  ``tokenizer.json`` it was trained with, so neither is used after it changed.
* The ``tokenizers`` library may panic on a crafted file (pyo3's ``PanicException`` is a
  ``BaseException``): any failure to load becomes one ValueError naming the file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..training.progress import on_terminal
from ..files.schema import RUN_SCHEMA, check
from ..files.storage import read_sealed_json, write_sealed_json
from ..text.tokenizer import Tokenizer
from ..files.untrusted import parse_json, read_bytes, sha256

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
MAX_TOKENIZER_BYTES = 256 << 20
# files whose presence means a directory holds a run (ours or a model another tool wrote)
RUN_MARKERS = (RUN_FILE, "config.json", "adapter_config.json", "model.safetensors",
               "adapter_model.safetensors", "optimizer.safetensors")


def prepare_out(out, *, resume: bool = False, force: bool = False, base=None) -> Path:
    """Create ``out`` if needed and check that this run may write there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if base is not None and out.exists() and Path(base).exists() and \
            os.path.samefile(out, base):
        raise ValueError(f"--out {out} is the base model's own directory; a fine-tune writes "
                         "into a directory of its own")
    held = [name for name in RUN_MARKERS if (out / name).exists()] if out.is_dir() else []
    if resume and not held:
        raise ValueError(f"--resume: {out} holds no run to resume")
    if held and not (resume or force):
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}); pass --resume "
                         "to continue it or --force to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".lowrank-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


def write_run(out, info: dict) -> Path:
    """``run.json`` with its integrity record (and the tokenizer's SHA-256 if one is there)."""
    out = Path(out)
    info = dict(info)
    tok = out / TOKENIZER_FILE
    if tok.is_file() and "tokenizer_sha256" not in info:
        info["tokenizer_sha256"] = sha256(read_bytes(tok, MAX_TOKENIZER_BYTES, "tokenizer"))
    info.pop("integrity", None)
    return write_sealed_json(out / RUN_FILE, info)


def read_run(out) -> dict:
    """``run.json`` of ``out`` (``{}`` if there is none), integrity and schema checked."""
    path = Path(out) / RUN_FILE
    if not os.path.lexists(path):
        return {}
    return check(read_sealed_json(path), RUN_SCHEMA, str(path))


def load_tokenizer(directory, run: dict | None = None) -> Tokenizer:
    """``tokenizer.json`` of ``directory``, checked against the SHA-256 ``run`` recorded."""
    path = Path(directory) / TOKENIZER_FILE
    data = read_bytes(path, MAX_TOKENIZER_BYTES, "tokenizer")
    want = (run or {}).get("tokenizer_sha256")
    if want is not None and sha256(data) != want:
        raise ValueError(f"{path} differs from the tokenizer {Path(directory) / RUN_FILE} "
                         "recorded (changed or corrupted)")
    spec = parse_json(data, path)
    # lowrank writes neither; the library panics on some settings of them (at encode time)
    if not isinstance(spec, dict) or any(spec.get(k) is not None for k in ("truncation",
                                                                            "padding")):
        raise ValueError(f"{path} is not a tokenizer lowrank wrote (it must be an object with "
                         "no truncation or padding settings)")
    try:
        return Tokenizer.load(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:   # pyo3's PanicException is not an Exception
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"cannot load tokenizer {path}: {type(exc).__name__}: "
                         f"{text[:200]}") from None


def remove_if_unsaved(out: Path, name: str, existed: bool) -> None:
    """After a failed run: remove ``name`` if this run created it and nothing was saved."""
    path = Path(out) / name
    saved = any((Path(out) / m).exists() for m in RUN_MARKERS)
    if not existed and not saved and path.is_file():
        path.unlink()


def say(line: str, progress: bool) -> None:
    """A line for the user (a validation loss as it comes) that leaves a progress bar intact."""
    if progress and on_terminal():
        from tqdm import tqdm   # a bar may be drawn: write above it
        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)
