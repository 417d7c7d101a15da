"""``lr.load_adapter``: any directory ``lowrank finetune`` writes, opened in one call
(docs/peft.md#inject-saved)."""
from __future__ import annotations

from pathlib import Path

from ..files.storage import read_json
from ..formats.adapter_dir import ADAPTER_CONFIG_FILE
from ..formats.peft_dir import is_peft_dir
from ..tasks import classify_io
from .run_dir import read_run
from .workflows import load_finetuned


def load_adapter(directory, base=None, dtype=None):
    """``(model, tokenizer)`` of any directory ``lowrank finetune`` writes: an adapter in
    lowrank's or PEFT's format (over ``base``, default: the base its run.json names), a full
    fine-tune, or a classifier (``--task classify``; in eval mode)."""
    if (Path(directory) / classify_io.TASK_FILE).is_file():
        clf, tok, _ = classify_io.load(directory, base, dtype or "float32")
        return clf, tok
    if base is None:   # a PEFT folder names its base in its config, lowrank's in run.json
        base = read_run(directory).get("base") if not is_peft_dir(directory) else \
            read_json(Path(directory) / ADAPTER_CONFIG_FILE).get("base_model_name_or_path")
    return load_finetuned(base, directory, dtype)


__all__ = ["load_adapter"]
