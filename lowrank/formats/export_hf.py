"""A Llama-family model out as a Hugging Face directory transformers loads
(docs/export.md#hf): ``config.json``, ``model.safetensors`` (float32, the checkpoint's names,
no ``lm_head.weight`` when tied), ``tokenizer.json``, ``tokenizer_config.json`` (special
tokens and the chat template), ``chat_template.jinja`` and ``generation_config.json``.

Everything is written into a temporary directory beside ``out`` and renamed into place last:
an interrupted export leaves no half-written ``out``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import backend
from ..models.llama import Llama
from ..files.storage import write_safetensors

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM"}


def check_exportable(model, out) -> str:
    """The family name of ``model`` (refused unless a Llama-family model) after checking that
    ``out`` does not exist yet."""
    if Path(out).exists():
        raise ValueError(f"{out} exists already: the export writes a new path (remove it or "
                         "name another)")
    if not isinstance(model, Llama):
        raise ValueError(f"export: a {type(model).__name__} is not a Llama-family model (the "
                         f"formats written: llama, qwen2, mistral)")
    family = (getattr(model, "pretrained_from", None) or {}).get("model_type")
    return family if family in ARCHITECTURES else \
        ("qwen2" if model.config.attention_bias else "llama")


def hf_config(model, family: str, special_ids: dict) -> dict:
    """The ``config.json`` transformers reads for ``model``."""
    c = model.config
    config = {
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32",
        "rope_scaling": None if c.rope_type == "default" else
        {"rope_type": c.rope_type, **c.rope_scaling},
    }
    if family == "llama":
        config["attention_bias"] = c.attention_bias
    if family == "mistral":
        config["sliding_window"] = None
    config.update(special_ids)
    return config


def host_tensors(model) -> dict:
    """``{checkpoint name: float32 host array}`` of every parameter (a tied head once)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = np.ascontiguousarray(backend.to_numpy(p.data), dtype=np.float32)
    return out


def special_ids(tokenizer) -> dict:
    """``{bos_token_id: 1, ...}`` of the special tokens the tokenizer names."""
    ids = {}
    for role in ("bos", "eos", "pad", "unk"):
        token = tokenizer.special_tokens.get(f"{role}_token")
        if token is not None and tokenizer.token_to_id(token) is not None:
            ids[f"{role}_token_id"] = int(tokenizer.token_to_id(token))
    return ids


def write_hf_dir(model, out, tokenizer, template=None) -> Path:
    """Write ``model`` (merged: plain weights) with its tokenizer and chat template
    (``ChatTemplate`` or None) as a Hugging Face directory ``out``; returns ``out``."""
    out = Path(out)
    family = check_exportable(model, out)
    ids = special_ids(tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(model, family, ids), indent=2))
        generation = {k: v for k, v in ids.items() if k in ("bos_token_id", "eos_token_id",
                                                            "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_safetensors(tmp / "model.safetensors", host_tensors(model), {"format": "pt"})
        (tmp / "tokenizer.json").write_text(tokenizer.hf.to_str())
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "model_max_length": model.config.max_position_embeddings,
                      "clean_up_tokenization_spaces": False,
                      **{k: v for k, v in tokenizer.special_tokens.items() if v is not None}}
        if template is not None:
            tok_config["chat_template"] = template.source
            (tmp / "chat_template.jinja").write_text(template.source, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        os.rename(tmp, out)   # refuses (does not replace) a directory made meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["write_hf_dir", "hf_config", "check_exportable", "host_tensors", "special_ids",
           "ARCHITECTURES"]
