"""lowrank — LoRA and its variants with hand-derived, verified gradients, on NumPy or CuPy."""
from pathlib import Path

from . import adapters, backend, models, ops
from .nn import decompose
from ._version import __version__
from .formats.checkpoint import load_model, save_model
from .nn.layers import Linear
from .models import GPT, GPTConfig
from .nn.module import Module, Parameter
from .formats.peft_dir import inject_saved, is_peft_dir, load_pretrained, save_pretrained
from .formats.hf_model import from_pretrained
from .quant import quantize_base
from .app.run_dir import read_run
from .files.storage import read_json
from .tasks import classify_io
from .text.tokenizer import Tokenizer
from .app.workflows import load_finetuned


def save(model, path, train_state=None):
    """Write ``model`` into directory ``path`` (safetensors weights + config.json), atomically."""
    return save_model(model, path, train_state=train_state)


def load(path, backend=None):
    """The model saved in directory ``path`` (on ``backend``, default: the active one)."""
    return load_model(path, backend)


def load_adapter(directory, base=None, dtype=None):
    """``(model, tokenizer)`` of any directory ``lowrank finetune`` writes: an adapter in
    lowrank's or PEFT's format (over ``base``, default: the base its run.json names), a full
    fine-tune, or a classifier (``--task classify``; in eval mode)."""
    if (Path(directory) / classify_io.TASK_FILE).is_file():
        clf, tok, _ = classify_io.load(directory, base, dtype or "float32")
        return clf, tok
    if base is None:   # a PEFT folder names its base in its config, lowrank's in run.json
        base = read_run(directory).get("base") if not is_peft_dir(directory) else \
            read_json(Path(directory) / "adapter_config.json").get("base_model_name_or_path")
    return load_finetuned(base, directory, dtype)


__all__ = ["adapters", "backend", "decompose", "models", "ops", "from_pretrained", "Tokenizer",
           "Linear", "Module", "Parameter", "GPT", "GPTConfig", "save", "load", "quantize_base",
           "save_pretrained", "load_pretrained", "inject_saved", "load_adapter"]
