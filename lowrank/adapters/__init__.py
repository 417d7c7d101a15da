"""Adapters: one file per variant, one registry, one contract (docs/variants.md#contract).

Every module in this package other than ``base`` and ``inject`` is a variant that registers
itself with ``@register(name, Config)`` when imported; they are imported here in name order,
so adding a variant is adding its file.
"""
import importlib
import pkgutil

from . import base
from ._peft import PeftCodec, validate_config
from .base import (AdaptedLinear, AdapterConfig, available, config, config_from_dict,
                   field_from_text, register)
from .inject import (adapted_modules, adapter_names, add_adapter, config_from_peft,
                     disable_adapter, inject, merge_all, merge_and_unload, set_adapter,
                     trainable_summary)


def peft_codecs() -> list:
    """The PEFT formats of the registered variants (each variant's ``peft_codec``)."""
    return [c for c in (base._lookup(name)[1].peft_codec for name in available()) if c]


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in ("base", "inject") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from .lora import LoraConfig, LoraLinear  # noqa: E402

__all__ = ["AdaptedLinear", "AdapterConfig", "available", "config", "config_from_dict",
           "field_from_text",
           "register", "inject", "adapted_modules", "merge_all", "LoraConfig", "LoraLinear",
           "merge_and_unload", "disable_adapter", "add_adapter", "set_adapter", "adapter_names",
           "trainable_summary", "config_from_peft", "peft_codecs", "PeftCodec",
           "validate_config"]
