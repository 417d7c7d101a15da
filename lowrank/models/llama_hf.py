"""Hugging Face ``llama`` / ``qwen2`` / ``mistral`` directories -> ``LlamaConfig`` and key maps
(docs/llama.md#files). The parameter names are the checkpoint's own, so the key map is the
identity; a field that would change the outputs and that lowrank does not implement is
refused by name.
"""
from __future__ import annotations

import re

from .llama_config import FIELD_OF, SCALING_FIELDS, LlamaConfig

# transformers' class defaults where a config.json omits a field
DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, tie_word_embeddings=False),
    "qwen2": dict(max_position_embeddings=32768, tie_word_embeddings=False),
    "mistral": dict(max_position_embeddings=131072, tie_word_embeddings=False,
                    sliding_window=4096),
}
# field: the values lowrank implements (the first is the default)
FIXED = {
    "llama": dict(hidden_act=("silu",), attention_bias=(False,), mlp_bias=(False,),
                  attention_dropout=(0, 0.0)),
    "qwen2": dict(hidden_act=("silu",), use_sliding_window=(False,), attention_dropout=(0, 0.0)),
    "mistral": dict(hidden_act=("silu",), attention_dropout=(0, 0.0)),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")


def _rope(hf: dict, where: str) -> tuple[float, str, dict | None]:
    """``(theta, rope_type, scaling fields)`` from ``rope_parameters`` (transformers 5) or
    the older ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if params is None:
        params = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: config.json field 'rope_parameters' must be an object")
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"{where}: config.json field 'partial_rotary_factor' = {partial!r} "
                         "is not supported (lowrank rotates the whole head)")
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{where}: config.json field 'rope_type' = {rope_type!r} is not "
                         "supported (lowrank implements 'default', 'linear', 'llama3')")
    return theta, rope_type, params or None


def llama_config(hf: dict, model_type: str, where: str) -> LlamaConfig:
    for key in REQUIRED:
        if key not in hf:
            raise ValueError(f"{where}: config.json has no {key!r}")
    defaults = DEFAULTS[model_type]
    for key, allowed in FIXED[model_type].items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{where}: config.json field {key!r} = {hf[key]!r} is not "
                             f"supported (lowrank implements {allowed[0]!r})")
    context = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
    if model_type == "mistral":
        window = hf.get("sliding_window", defaults["sliding_window"])
        if window is not None and window < context:
            raise ValueError(f"{where}: config.json field 'sliding_window' = {window!r} is "
                             f"shorter than max_position_embeddings ({context}): lowrank "
                             "implements full causal attention only")
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{where}: config.json field 'layer_types' holds "
                         f"{sorted(set(layer_types) - {'full_attention'})[0]!r}: lowrank "
                         "implements full_attention only")
    theta, rope_type, scaling = _rope(hf, where)
    unknown = sorted(set(scaling or {}) - set(FIELD_OF))
    if unknown:
        raise ValueError(f"{where}: config.json rope field {unknown[0]!r} is not supported "
                         f"with rope_type {rope_type!r}")
    scaling = {FIELD_OF[k]: v for k, v in (scaling or {}).items()
               if k in SCALING_FIELDS[rope_type]}
    missing = [k for k in SCALING_FIELDS[rope_type] if FIELD_OF[k] not in scaling]
    if missing:
        raise ValueError(f"{where}: config.json rope_type {rope_type!r} is missing field "
                         f"{missing[0]!r}")
    try:
        return LlamaConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
            max_position_embeddings=context,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_type=rope_type,
            **scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", defaults["tie_word_embeddings"]),
            attention_bias=model_type == "qwen2")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def config_reader(model_type: str):
    """The registry's ``config_from_hf(hf_config, tensor_keys, where)`` for ``model_type``."""
    def read(hf: dict, keys, where: str) -> LlamaConfig:
        return llama_config(hf, model_type, where)
    return read


def llama_key_map(model) -> dict:
    return {name: (name, None) for name, _ in model.named_parameters()}


def llama_ignored(cfg: LlamaConfig):
    """Older files keep RoPE's ``inv_freq`` buffers; a tied head may be saved anyway."""
    pattern = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
    return re.compile(pattern + ("|lm_head\\.weight" if cfg.tie_word_embeddings else ""))
