"""lowrank — LoRA and its variants with hand-derived, verified gradients, on NumPy or CuPy.

``lr.*`` is the public API (docs/api.md); where each part lives: docs/README.md#where-things-are.
"""
from . import adapters, backend, models, ops
from ._version import __version__
from .app.load_adapter import load_adapter
from .formats.checkpoint import save_model
from .formats.model_dir import from_pretrained, open_model
from .formats.peft_api import (AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig,
                               PeftModel, VeraConfig, get_peft_model)
from .formats.peft_dir import inject_saved, load_pretrained, save_pretrained
from .models import GPT, GPTConfig
from .nn import decompose
from .nn.layers import Linear
from .nn.module import Module, Parameter
from .quant import quantize_base
from .text.tokenizer import Tokenizer
from .training.trainer import TrainConfig, Trainer

# SPEC's stable spelling of the two (docs/api.md): the adapters package cannot import the
# formats layer above it, so the names are set here, once, on the package.
adapters.save_pretrained = save_pretrained
adapters.load_pretrained = load_pretrained


def save(model, path, train_state=None):
    """Write ``model`` into directory ``path`` (safetensors weights + config.json), atomically."""
    return save_model(model, path, train_state=train_state)


def load(path, backend=None):
    """The model in directory ``path`` (lowrank's or Hugging Face's) on ``backend`` (default:
    the active one), in the dtype it was saved in."""
    return open_model(path, backend=backend)


__all__ = ["adapters", "backend", "decompose", "models", "ops", "from_pretrained", "open_model",
           "save_pretrained", "load_pretrained", "inject_saved", "load_adapter", "Tokenizer",
           "Linear", "Module", "Parameter", "GPT", "GPTConfig", "Trainer", "TrainConfig", "save",
           "load", "quantize_base", "__version__",
           # PEFT's entry points, PEFT's spelling (docs/peft.md#peft-shaped-api)
           "LoraConfig", "AdaLoraConfig", "VeraConfig", "LoHaConfig", "LoKrConfig",
           "PeftConfig", "PeftModel", "get_peft_model"]
