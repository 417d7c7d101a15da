"""Adapters: one file per variant, one registry, one contract (SPEC §2)."""
from .base import (AdaptedLinear, AdapterConfig, available, config, config_from_dict,
                   register)
from . import lora  # noqa: F401  (registers "lora")
from .lora import LoraConfig, LoraLinear

__all__ = ["AdaptedLinear", "AdapterConfig", "available", "config", "config_from_dict",
           "register", "LoraConfig", "LoraLinear"]
