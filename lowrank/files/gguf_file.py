"""GGUF files (llama.cpp's format) in: a Llama-family model's hyper-parameters as a Hugging
Face config dict, and its tensors under the Hugging Face names, dequantised to float32
(docs/gguf.md#files).

Read with the ``gguf`` package, the GGUF project's own reader; blocks are dequantised by its
``gguf.quants.dequantize``, so the numbers equal what transformers loads from the same file bit
for bit. Everything is checked from the header before a tensor is dequantised: the
architecture, every tensor's type, name and shape against the metadata, and every tensor's
bytes inside the file. A file that fails a check is refused in one line naming the field.

llama.cpp stores the rows of ``q`` and ``k`` of a ``llama`` file interleaved per head for its
own RoPE layout (the pairs ``(x_i, x_{i+d/2})`` side by side); ``unpermute_qk`` undoes that for
transformers' rotate-half layout and ``permute_qk`` redoes it. ``qwen2`` files keep the
Hugging Face order.

Host-side I/O: numpy only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = ("llama", "qwen2")     # a Mistral file says ``llama`` (and its name says mistral)
PERMUTED_ARCHITECTURES = ("llama",)   # llama.cpp reorders q/k rows for these only

# llama.cpp name -> Hugging Face name ({i}: the layer)
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rows of q (or k) -> llama.cpp's order: per head, the halves interleaved."""
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])     # (H, 2, hd/2, ...)
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rows of q (or k) -> the Hugging Face order (inverse of ``permute_qk``)."""
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, head_dim // 2, 2, *w.shape[1:])     # (H, hd/2, 2, ...)
            .swapaxes(1, 2).reshape(w.shape))


def _open(path: Path):
    """The ``gguf`` reader over the file (memory-mapped: nothing is read into memory yet)."""
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _reader(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1)   # the model, its tokenizer and its chat template read one header
def _reader(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader
    try:
        return GGUFReader(path, "r")
    except Exception as exc:   # the reader's own checks: magic, version, truncated header
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{path}: not a readable GGUF file ({message})") from None


@dataclass
class GGUFModel:
    """What a GGUF file says, checked: ``config`` (a Hugging Face config dict), ``metadata``
    (every key's value), ``names`` ({llama.cpp tensor name: Hugging Face name})."""
    path: Path
    architecture: str
    config: dict
    metadata: dict
    names: dict
    _reader: object

    def shapes(self) -> dict:
        """``{Hugging Face name: shape}`` from the header (nothing dequantised)."""
        return {self.names[t.name]: _hf_shape(t) for t in self._reader.tensors}

    def iter_tensors(self):
        """``(Hugging Face name, float32 host array)`` one tensor at a time, dequantised with
        ``gguf.quants.dequantize``, q/k rows back in the Hugging Face order."""
        from gguf.quants import dequantize
        heads = {"attn_q": self.config["num_attention_heads"],
                 "attn_k": self.config["num_key_value_heads"]}
        for t in self._reader.tensors:
            array = dequantize(t.data, t.tensor_type)
            # F32 comes back as a view of the memory-mapped file: copy it; the others are new
            array = np.array(array, dtype=np.float32) if t.tensor_type.name == "F32" else \
                np.asarray(array, dtype=np.float32)
            array = array.reshape(_hf_shape(t))
            kind = t.name.split(".")[-2]
            if self.architecture in PERMUTED_ARCHITECTURES and kind in heads:
                array = unpermute_qk(array, heads[kind])
            yield self.names[t.name], array

    def types(self) -> dict:
        """``{Hugging Face name: type name}`` (``"Q4_1"``, ``"F32"``, ...) from the header."""
        return {self.names[t.name]: t.tensor_type.name for t in self._reader.tensors}

    def iter_raw(self, wanted=None):
        """``(Hugging Face name, type name, raw, shape)`` of each tensor (``wanted``: a set of
        Hugging Face names, default all): ``raw`` is a host copy of its bytes as stored,
        ``(rows, bytes per row)`` uint8, the rows of q/k in the Hugging Face order (a row is
        whole blocks, so reordering rows moves blocks, never splits one)."""
        heads = {"attn_q": self.config["num_attention_heads"],
                 "attn_k": self.config["num_key_value_heads"]}
        for t in self._reader.tensors:
            if wanted is not None and self.names[t.name] not in wanted:
                continue
            shape = _hf_shape(t)
            raw = np.asarray(t.data).view(np.uint8).reshape(shape[0] if len(shape) > 1 else 1,
                                                             -1)
            kind = t.name.split(".")[-2]
            if self.architecture in PERMUTED_ARCHITECTURES and kind in heads:
                raw = unpermute_qk(raw, heads[kind])
            yield self.names[t.name], t.tensor_type.name, np.array(raw, copy=True), shape

    def tensors(self) -> dict:
        """``{Hugging Face name: float32 host array}`` (every ``iter_tensors`` item)."""
        return dict(self.iter_tensors())


def _hf_shape(t) -> tuple:
    return tuple(int(n) for n in reversed(t.shape.tolist()))   # GGUF lists ne0 (inner) first


def read_metadata(reader) -> dict:
    """``{key: value}`` of every metadata field (arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


class _Fields:
    """Typed access to ``{arch}.*`` fields; a missing or ill-typed one -> ValueError naming it."""

    def __init__(self, path, metadata, arch):
        self.path, self.metadata, self.arch = path, metadata, arch

    def get(self, key, kind, default=None):
        name = f"{self.arch}.{key}"
        if name not in self.metadata:
            if default is None:
                raise ValueError(f"{self.path}: metadata field '{name}' is missing")
            return default
        value = self.metadata[name]
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) and value > 0
              if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
              if kind is float else isinstance(value, kind))
        if not ok:
            what = {int: "a positive integer", float: "a positive number"}.get(
                kind, getattr(kind, "__name__", str(kind)))
            raise ValueError(f"{self.path}: metadata field '{name}' = {_short(value)} is not "
                             f"{what}")
        return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _architecture(path, metadata) -> str:
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    return arch


def _config(path, metadata, arch, tensor_names) -> dict:
    """The Hugging Face config dict the ``{arch}.*`` fields describe."""
    f = _Fields(path, metadata, arch)
    hidden = f.get("embedding_length", int)
    heads = f.get("attention.head_count", int)
    kv_heads = f.get("attention.head_count_kv", int, default=heads)
    head_dim = f.get("attention.key_length", int, default=hidden // heads)
    rot = f.get("rope.dimension_count", int, default=head_dim)
    if rot != head_dim:
        raise ValueError(f"{path}: metadata field '{arch}.rope.dimension_count' = {rot} differs "
                         f"from the head dimension {head_dim} (partial rotary is not supported)")
    if heads % kv_heads:
        raise ValueError(f"{path}: metadata field '{arch}.attention.head_count_kv' = {kv_heads} "
                         f"does not divide '{arch}.attention.head_count' = {heads}")
    value_dim = f.get("attention.value_length", int, default=head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{path}: metadata field '{arch}.attention.value_length' = {value_dim} "
                         f"differs from the key length {head_dim}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = f.get("vocab_size", int, default=len(tokens) if isinstance(tokens, list) else -1)
    config = {
        "model_type": arch,
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "hidden_size": hidden,
        "intermediate_size": f.get("feed_forward_length", int),
        "num_hidden_layers": f.get("block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(f.get("attention.layer_norm_rms_epsilon", float)),
        "rope_theta": float(f.get("rope.freq_base", float, default=10000.0)),
        "rope_scaling": _rope_scaling(f),
        "max_position_embeddings": f.get("context_length", int),
        "vocab_size": vocab if vocab > 0 else None,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[name] = int(value)
    biases = {b for b in _BIASES if f"blk.0.{b}" in tensor_names}
    if arch == "llama" and biases:
        config["attention_bias"] = True
    if arch == "llama" and "mistral" in str(metadata.get("general.name", "")).lower():
        # llama.cpp writes Mistral as ``llama``; transformers reads such a file as ``mistral``
        # (no sliding window: llama.cpp applies none to this architecture either)
        config.update(model_type="mistral", architectures=["MistralForCausalLM"],
                      sliding_window=None)
    return config


def _rope_scaling(f: _Fields):
    kind = f.get("rope.scaling.type", str, default="none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"{f.path}: metadata field '{f.arch}.rope.scaling.type' = {kind!r} is "
                         "not supported (supported: none, linear)")
    return {"rope_type": "linear", "factor": float(f.get("rope.scaling.factor", float))}


def _expected(config) -> dict:
    """``{llama.cpp name: (Hugging Face shape, the metadata that implies it)}``."""
    a = config["model_type"] if config["model_type"] != "mistral" else "llama"
    d, v, ff = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    dims = f"{a}.embedding_length={d}"
    heads = f"{a}.attention.head_count × head dim = {q}"
    kv_heads = f"{a}.attention.head_count_kv × head dim = {kv}"
    ffn = f"{a}.feed_forward_length={ff}"
    out = {"token_embd.weight": ((v, d), f"{a}.vocab_size={v}, {dims}"),
           "output_norm.weight": ((d,), dims)}
    if not config["tie_word_embeddings"]:
        out["output.weight"] = ((v, d), f"{a}.vocab_size={v}, {dims}")
    per_layer = {
        "attn_norm.weight": ((d,), dims), "ffn_norm.weight": ((d,), dims),
        "attn_q.weight": ((q, d), f"{heads}, {dims}"),
        "attn_k.weight": ((kv, d), f"{kv_heads}, {dims}"),
        "attn_v.weight": ((kv, d), f"{kv_heads}, {dims}"),
        "attn_output.weight": ((d, q), f"{dims}, {heads}"),
        "ffn_gate.weight": ((ff, d), f"{ffn}, {dims}"),
        "ffn_up.weight": ((ff, d), f"{ffn}, {dims}"),
        "ffn_down.weight": ((d, ff), f"{dims}, {ffn}"),
    }
    biased = config["model_type"] == "qwen2" or config.get("attention_bias")
    if biased:
        per_layer.update({"attn_q.bias": ((q,), heads), "attn_k.bias": ((kv,), kv_heads),
                          "attn_v.bias": ((kv,), kv_heads)})
    for i in range(config["num_hidden_layers"]):
        for name, spec in per_layer.items():
            out[f"blk.{i}.{name}"] = spec
    return out


def _block_elems(kind: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    return GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0]


def _hf_name(name: str):
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _check_tensors(path, reader, config) -> dict:
    """Every tensor's type, name, shape and extent; ``{llama.cpp name: Hugging Face name}``."""
    size = path.stat().st_size
    expected = _expected(config)
    names, layers = {}, config["num_hidden_layers"]
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor '{t.name}' has type {kind}, which is not supported "
                             f"(supported: {', '.join(SUPPORTED_TYPES)})")
        if t.name not in expected:
            m = _LAYER_RE.fullmatch(t.name)
            why = (f"its layer is beyond {config['model_type']}.block_count={layers}"
                   if m and _hf_name(t.name) else "no such parameter in a "
                   f"{config['model_type']} model")
            raise ValueError(f"{path}: unexpected tensor '{t.name}' ({why})")
        shape, implied_by = expected[t.name]
        block = _block_elems(kind)
        if _hf_shape(t)[-1] % block:
            raise ValueError(f"{path}: tensor '{t.name}' has rows of {_hf_shape(t)[-1]} values, "
                             f"not a whole number of {kind} blocks of {block}")
        if _hf_shape(t) != shape:
            raise ValueError(f"{path}: tensor '{t.name}' has shape {_hf_shape(t)}, but the "
                             f"metadata ({implied_by}) gives {shape}")
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: tensor '{t.name}' ({t.n_bytes} bytes at offset "
                             f"{t.data_offset}) lies beyond the end of the file ({size} bytes)")
        if t.name in names:
            raise ValueError(f"{path}: tensor '{t.name}' appears twice")
        names[t.name] = _hf_name(t.name)
    for name, (shape, implied_by) in expected.items():
        if name not in names:
            raise ValueError(f"{path}: tensor '{name}' is missing (the metadata, {implied_by}, "
                             "needs it)")
    return names


def gguf_metadata(path) -> dict:
    """``{key: value}`` of a GGUF file's metadata (its tensors untouched)."""
    path = Path(path)
    return _metadata(path, _open(path))


def _metadata(path, reader) -> dict:
    try:
        return read_metadata(reader)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: a metadata field cannot be read ({exc})") from None


def open_gguf(path) -> GGUFModel:
    """Check ``path`` (header, metadata, every tensor's type, shape and bytes) and return
    what it says; tensors are dequantised only by ``GGUFModel.tensors()``."""
    path = Path(path)
    reader = _open(path)
    metadata = _metadata(path, reader)
    arch = _architecture(path, metadata)
    tensor_names = {t.name for t in reader.tensors}
    config = _config(path, metadata, arch, tensor_names)
    if config["vocab_size"] is None:
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise ValueError(f"{path}: metadata field '{arch}.vocab_size' is missing (and no "
                             "tokenizer.ggml.tokens nor token_embd.weight gives it)")
        config["vocab_size"] = _hf_shape(embed)[0]
    names = _check_tensors(path, reader, config)
    return GGUFModel(path, arch, config, metadata, names, reader)


__all__ = ["open_gguf", "gguf_metadata", "GGUFModel", "permute_qk", "unpermute_qk",
           "read_metadata", "SUPPORTED_TYPES", "ARCHITECTURES"]
