"""lowrank — LoRA and its variants with hand-derived, verified gradients, on NumPy or CuPy."""
from . import adapters, backend, decompose, models, ops
from .layers import Linear
from .models import GPT, GPTConfig
from .module import Module, Parameter
from .pretrained import from_pretrained
from .tokenizer import Tokenizer

__version__ = "0.1.0"


def save(model, path, train_state=None):
    """Write ``model`` into directory ``path`` (safetensors weights + config.json), atomically."""
    from .checkpoint import save_model
    return save_model(model, path, train_state=train_state)


def load(path, backend=None):
    """The model saved in directory ``path`` (on ``backend``, default: the active one)."""
    from .checkpoint import load_model
    return load_model(path, backend)


__all__ = ["adapters", "backend", "decompose", "models", "ops", "from_pretrained", "Tokenizer", "Linear", "Module", "Parameter",
           "GPT", "GPTConfig", "save", "load"]
