"""A Llama-family model out as a GGUF file in llama.cpp's layout (docs/export.md#gguf),
written with the ``gguf`` package's ``GGUFWriter``.

Tensor names are llama.cpp's (``token_embd``, ``blk.{i}.attn_q``, ...); the rows of q and k
are permuted into llama.cpp's RoPE order for a ``llama`` file (``qwen2`` keeps them);
hyper-parameters go under ``{arch}.*``, the tokenizer under ``tokenizer.ggml.*`` and the chat
template under ``tokenizer.chat_template``. Matrices are stored as F32, F16, Q8_0, Q4_0 or
Q4_1 (quantised by ``gguf.quants.quantize``, the package's port of llama.cpp's reference
quantisers); vectors (norms, biases) stay F32, as llama.cpp keeps them. The error of storing
the float weights in the chosen type is measured on the way and returned.

The file is written beside ``out`` under a temporary name and renamed into place last.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..files.gguf_file import PERMUTED_ARCHITECTURES, permute_qk
from .export_hf import check_exportable, host_tensors

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
_LAYER = {"input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
          "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
          "self_attn.o_proj.weight": "attn_output.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """llama.cpp's name of the checkpoint parameter ``name``."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".", 3)   # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{int(parts[2])}.{_LAYER[parts[3]]}"
    raise ValueError(f"export: parameter {name!r} has no GGUF name")


class _Error:
    """Running sums of the storage error over every quantised matrix."""

    def __init__(self):
        self.sq_err = self.sq = 0.0
        self.max_abs = 0.0
        self.count = 0

    def add(self, w: np.ndarray, stored: np.ndarray) -> None:
        diff = stored.astype(np.float64) - w
        self.sq_err += float((diff * diff).sum())
        self.sq += float((w.astype(np.float64) ** 2).sum())
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        self.count += w.size

    def report(self) -> dict:
        rms = (self.sq_err / max(self.count, 1)) ** 0.5
        return {"weight_rms_error": rms, "weight_max_error": self.max_abs,
                "relative_rms_error": (self.sq_err / self.sq) ** 0.5 if self.sq else 0.0}


def _encode(gguf, w: np.ndarray, qtype: str, name: str, errors: _Error):
    """``(data, raw type or None)`` of ``w`` stored as ``qtype`` (vectors: F32)."""
    if w.ndim == 1 or qtype == "F32":
        return np.ascontiguousarray(w, dtype=np.float32), None
    if qtype == "F16":
        data = w.astype(np.float16)
        errors.add(w, data.astype(np.float32))
        return data, None
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    if w.shape[-1] % block:
        raise ValueError(f"export: tensor '{name}' has rows of {w.shape[-1]} values, not a "
                         f"whole number of {qtype} blocks of {block} (use F32 or F16)")
    kind = gguf.GGMLQuantizationType[qtype]
    data = gguf.quants.quantize(w, kind)
    errors.add(w, gguf.quants.dequantize(data, kind))
    return data, kind


def _hyper_parameters(w, model, name: str) -> None:
    c = model.config
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    if c.rope_type == "linear":
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(c.rope_factor))
    elif c.rope_type != "default":
        raise ValueError(f"export: rope type {c.rope_type!r} has no GGUF form here (default, "
                         "linear)")


def _tokenizer_fields(w, tokenizer, template, source_metadata) -> None:
    """``tokenizer.ggml.*``: the source GGUF's own fields when the model came from one, else
    the byte-level BPE of ``tokenizer`` (tokens by id, merges, control tokens)."""
    meta = source_metadata or {}
    if "tokenizer.ggml.tokens" in meta:
        tokens, merges = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.merges", [])
        types, pre = meta.get("tokenizer.ggml.token_type"), meta.get("tokenizer.ggml.pre")
    else:
        tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer.merges()]
        special = set(tokenizer.special_tokens.values())
        types, pre = [3 if t in special else 1 for t in tokens], None
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    if types:
        w.add_token_types(types)
    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                      ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
        token = tokenizer.special_tokens.get(f"{role}_token")
        if token is not None and tokenizer.token_to_id(token) is not None:
            add(int(tokenizer.token_to_id(token)))
    if template is not None:
        w.add_chat_template(template.source)


def write_gguf(model, out, tokenizer, template=None, qtype: str = "F32",
               source_metadata=None, name: str = "lowrank export") -> dict:
    """Write ``model`` (merged: plain weights) to the GGUF file ``out`` with matrices as
    ``qtype``; returns ``{"path", "type", "tensors", "weight_rms_error", ...}``."""
    import gguf
    if qtype not in TYPES:
        raise ValueError(f"export: GGUF type {qtype!r} is not written (types: "
                         f"{', '.join(TYPES)})")
    out = Path(out)
    family = check_exportable(model, out)
    arch = "llama" if family == "mistral" else family
    heads = {"attn_q": model.config.num_attention_heads,
             "attn_k": model.config.num_key_value_heads}
    errors = _Error()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        _hyper_parameters(w, model, name)
        w.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if qtype == "F32" else
                                "MOSTLY_" + qtype))
        _tokenizer_fields(w, tokenizer, template, source_metadata)
        tensors = host_tensors(model)
        for hf_name, array in tensors.items():
            gname = gguf_name(hf_name)
            kind = gname.split(".")[-2]
            if arch in PERMUTED_ARCHITECTURES and kind in heads:
                array = np.ascontiguousarray(permute_qk(array, heads[kind]))
            data, raw = _encode(gguf, array, qtype, gname, errors)
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if out.exists():
            raise ValueError(f"{out} exists already: the export writes a new path")
        os.rename(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"path": str(out), "type": qtype, "tensors": len(tensors), **errors.report()}


__all__ = ["write_gguf", "gguf_name", "TYPES"]
