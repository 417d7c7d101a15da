"""The models seam: a registry from a model name (a ``model_type``) to its config class, its
module class and how a foreign (Hugging Face) checkpoint maps onto it.

``lr.load`` / ``checkpoint.load_model`` build a lowrank checkpoint's model through
``build``; ``lr.from_pretrained`` reads a Hugging Face directory through ``entry(model_type)``
(docs/pretrained.md#registry). A new family registers one ``ModelEntry``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .bert import Bert, BertConfig, BertLayer
from .classifier import SequenceClassifier
from .blocks import Block, Embedding, GPTBlock, LayerNorm, Parts
from .gpt import GPT, GPTConfig
from .llama import Llama
from .llama_config import LlamaConfig
from . import llama_hf
from . import hf


@dataclass(frozen=True)
class ModelEntry:
    """``config_from_hf(hf_config: dict, tensor_keys: set, where: str) -> config``;
    ``key_map(model) -> {lowrank name: (foreign key, transform or None)}``;
    ``ignored(config) -> compiled regex`` of foreign keys that are buffers, not parameters;
    ``prefix``: the task-model prefix foreign files may put on every key."""
    name: str
    config_cls: type
    module_cls: type
    config_from_hf: Callable | None = None
    key_map: Callable | None = None
    ignored: Callable | None = None
    prefix: str = ""


_REGISTRY: dict[str, ModelEntry] = {}
DEFAULT_MODEL_TYPE = "gpt"   # lowrank checkpoints written before the registry hold a GPT


def register(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model type {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def names() -> list[str]:
    return sorted(_REGISTRY)


def entry(model_type) -> ModelEntry:
    if model_type not in _REGISTRY:
        raise ValueError(f"unknown model_type {model_type!r}; registered: {names()}")
    return _REGISTRY[model_type]


def config_from_dict(data: dict, where: str = "config"):
    """A lowrank config from its saved dict (``model_type`` names the family; default GPT)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: model config must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    e = entry(data.pop("model_type", DEFAULT_MODEL_TYPE))
    try:
        return e.config_cls(**data)
    except TypeError as exc:
        raise ValueError(f"{where}: model config does not fit {e.config_cls.__name__}: "
                         f"{exc}") from exc


def build(config, dtype=None, xp=None, seed: int = 0):
    """The module for ``config`` (any registered config class), randomly initialised."""
    for e in _REGISTRY.values():
        if type(config) is e.config_cls:
            kwargs = {} if dtype is None else {"dtype": dtype}
            return e.module_cls(config, seed=seed, xp=xp, **kwargs)
    raise ValueError(f"no registered model takes a {type(config).__name__}")


def _gpt2_config(hf_config, keys, where):
    return hf.gpt2_config(hf_config, where)


def _bert_config(hf_config, keys, where):
    pooler = any(re.fullmatch(r"(bert\.)?pooler\.dense\.weight", k) for k in keys)
    return hf.bert_config(hf_config, where, pooler=pooler)


register(ModelEntry("gpt", GPTConfig, GPT))
register(ModelEntry("gpt2", GPTConfig, GPT, _gpt2_config, hf.gpt2_key_map, hf.gpt2_ignored,
                    prefix="transformer."))
register(ModelEntry("bert", BertConfig, Bert, _bert_config, hf.bert_key_map, hf.bert_ignored,
                    prefix="bert."))
register(ModelEntry("llama", LlamaConfig, Llama, llama_hf.config_reader("llama"),
                    llama_hf.llama_key_map, llama_hf.llama_ignored))
for _name in ("qwen2", "mistral"):   # the same module; build() finds "llama" by config class
    register(ModelEntry(_name, LlamaConfig, Llama, llama_hf.config_reader(_name),
                        llama_hf.llama_key_map, llama_hf.llama_ignored))

__all__ = ["ModelEntry", "register", "entry", "names", "build", "config_from_dict",
           "GPT", "GPTConfig", "Bert", "BertConfig", "BertLayer", "SequenceClassifier",
           "Llama", "LlamaConfig", "Block", "GPTBlock",
           "Embedding", "LayerNorm", "Parts"]
