"""Tiny GGUF files for the tests, written with the ``gguf`` package's own writer the way
llama.cpp's converter writes a Llama: q/k rows permuted, tensors quantised block-wise."""
from __future__ import annotations

import numpy as np

from lowrank.files.gguf_file import permute_qk
from lowrank.text.tokenizer_files import byte_spelling

gguf = __import__("pytest").importorskip("gguf")
T = gguf.GGMLQuantizationType

TINY = dict(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, vocab=300)
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def k_quant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant blocks (the ``gguf`` package quantises none of these types) with finite
    float16 scales: ``(rows, bytes per row)`` uint8."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block_elems
    blocks = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, size=(n, 2)).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:       # ql, qh, scales, then d
        blocks[:, -2:] = scales[:, :2]
    else:                      # d, dmin, then the rest
        blocks[:, :4] = scales
    return blocks.reshape(rows, cols // block_elems * block_bytes)


def encode_as(array: np.ndarray, qtype, rng) -> np.ndarray:
    """``array`` stored as ``qtype``: what ``GGUFWriter.add_tensor`` gets."""
    if qtype == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        return k_quant_blocks(rng, *array.shape, qtype)
    try:
        return gguf.quants.quantize(array.astype(np.float32), qtype)
    except NotImplementedError:   # a type lowrank refuses anyway: any bytes of the right size
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = array.shape
        return rng.integers(0, 256, size=(rows, cols // block_elems * block_bytes),
                            dtype=np.uint8)


def tiny_vocab(size: int):
    """``(tokens, merges, token types)``: the control tokens, the 256 byte characters, then
    merges of frequent pairs up to ``size`` tokens."""
    chars = list(byte_spelling().values())
    tokens, merges = list(CONTROL_TOKENS) + chars, []
    pieces = ["Ġ", "t", "h", "e", "a", "n", "i", "o", "s", "r"]
    pairs = [(a, b) for a in pieces for b in pieces]
    for a, b in pairs:
        if len(tokens) >= size:
            break
        if a + b not in tokens:
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    types = [3] * len(CONTROL_TOKENS) + [1] * (len(tokens) - len(CONTROL_TOKENS))
    return tokens, merges, types


def write_tiny_gguf(path, *, arch="llama", types=None, tied=False, seed=0, shape=None,
                    tokenizer=True, extra=None, name="tiny", meta=None):
    """Write a tiny ``arch`` model to ``path``; returns ``{llama.cpp name: (qtype, bytes or
    array written, the Hugging Face array it came from)}``. ``types``: {name suffix: qtype}
    (default F32); ``tokenizer``: False for none, or {field: value or None} changing the
    tiny tokenizer's fields; ``shape``: overrides of TINY; ``meta``: overrides of TINY in the
    metadata only (a file whose metadata and tensors disagree); ``extra``: metadata to add."""
    s = {**TINY, **(shape or {})}
    m = {**s, **(meta or {})}
    rng = np.random.default_rng(seed)
    d, f, h, kv = s["hidden"], s["ffn"], s["heads"], s["kv_heads"]
    hd = d // h
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(m["layers"])
    w.add_context_length(128)
    w.add_embedding_length(m["hidden"])
    w.add_feed_forward_length(m["ffn"])
    w.add_head_count(m["heads"])
    w.add_head_count_kv(m["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(m["vocab"])
    if tokenizer:
        tokens, merge_list, token_types = tiny_vocab(s["vocab"])
        fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                  "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": token_types,
                  "tokenizer.ggml.merges": merge_list,
                  "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                  "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                  "tokenizer.chat_template": CHATML}
        fields.update(tokenizer if isinstance(tokenizer, dict) else {})
        for key, value in fields.items():
            if value is None:
                continue
            if isinstance(value, list):
                w.add_array(key, value)
            elif isinstance(value, str):
                w.add_string(key, value)
            else:
                w.add_uint32(key, value)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    hf_shapes = {"token_embd.weight": (s["vocab"], d), "output_norm.weight": (d,)}
    if not tied:
        hf_shapes["output.weight"] = (s["vocab"], d)
    for i in range(s["layers"]):
        for key, shp in (("attn_norm.weight", (d,)), ("ffn_norm.weight", (d,)),
                         ("attn_q.weight", (h * hd, d)), ("attn_k.weight", (kv * hd, d)),
                         ("attn_v.weight", (kv * hd, d)), ("attn_output.weight", (d, h * hd)),
                         ("ffn_gate.weight", (f, d)), ("ffn_up.weight", (f, d)),
                         ("ffn_down.weight", (d, f))):
            hf_shapes[f"blk.{i}.{key}"] = shp
        if arch == "qwen2":
            for key, n in (("attn_q.bias", h * hd), ("attn_k.bias", kv * hd),
                           ("attn_v.bias", kv * hd)):
                hf_shapes[f"blk.{i}.{key}"] = (n,)
    written = {}
    for gname, shp in hf_shapes.items():
        hf = rng.standard_normal(shp) * (0.02 if len(shp) == 2 else 1.0) + (len(shp) == 1)
        stored = hf
        kind = gname.split(".")[-2]
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            stored = permute_qk(hf, h if kind == "attn_q" else kv)
        qtype = T.F32
        for suffix, t in (types or {}).items():
            if (gname == suffix or gname.endswith("." + suffix)) and len(shp) == 2:
                qtype = t
        data = encode_as(stored, qtype, rng)
        w.add_tensor(gname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        written[gname] = (qtype, data, hf)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
