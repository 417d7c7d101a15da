"""lowrank — LoRA and its variants with hand-derived, verified gradients, on NumPy or CuPy."""
from . import adapters, backend, models, ops
from .nn import decompose
from ._version import __version__
from .formats.checkpoint import load_model, save_model
from .nn.layers import Linear
from .models import GPT, GPTConfig
from .nn.module import Module, Parameter
from .formats.peft_dir import load_pretrained, save_pretrained
from .formats.hf_model import from_pretrained
from .quant import quantize_base
from .text.tokenizer import Tokenizer

# PEFT-format adapter directories (docs/peft.md): the module reads lowrank's adapter files as
# well, so it sits above the adapters package; its two functions are the package's API.
adapters.save_pretrained = save_pretrained
adapters.load_pretrained = load_pretrained


def save(model, path, train_state=None):
    """Write ``model`` into directory ``path`` (safetensors weights + config.json), atomically."""
    return save_model(model, path, train_state=train_state)


def load(path, backend=None):
    """The model saved in directory ``path`` (on ``backend``, default: the active one)."""
    return load_model(path, backend)


__all__ = ["adapters", "backend", "decompose", "models", "ops", "from_pretrained", "Tokenizer", "Linear", "Module", "Parameter",
           "GPT", "GPTConfig", "save", "load", "quantize_base"]
