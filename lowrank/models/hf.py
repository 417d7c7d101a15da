"""Hugging Face checkpoints -> lowrank models: config translation and key maps
(docs/pretrained.md#gpt2, docs/pretrained.md#bert).

A key map is ``{lowrank parameter name: (foreign key, transform)}``; ``transform`` turns the
foreign host array into the lowrank layout (``None``: as stored). Keys are given without the
task-model prefix (``transformer.`` / ``bert.``); the loader strips it.
"""
from __future__ import annotations

import re

from .bert import GELU_OF_ACT, BertConfig
from .gpt import GPTConfig


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise ValueError(f"{where}: config.json has no {key!r}")
    return hf[key]


def _unsupported(hf: dict, where: str, **expected) -> None:
    """Raise if a field the lowrank model cannot express has a non-default value."""
    for key, allowed in expected.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{where}: config.json field {key!r} = {hf[key]!r} is not "
                             f"supported (lowrank implements {allowed[0]!r})")


# --- GPT-2 ----------------------------------------------------------------------------------

def gpt2_config(hf: dict, where: str = "gpt2") -> GPTConfig:
    d = _need(hf, "n_embd", where)
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * d:
        raise ValueError(f"{where}: config.json field 'n_inner' = {n_inner} is not supported "
                         f"(lowrank's MLP is 4·n_embd = {4 * d} wide)")
    _unsupported(hf, where, activation_function=("gelu_new", "gelu_pytorch_tanh"),
                 scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,),
                 reorder_and_upcast_attn=(False,), add_cross_attention=(False,))
    return GPTConfig(vocab_size=_need(hf, "vocab_size", where),
                     context=_need(hf, "n_positions", where),
                     n_layer=_need(hf, "n_layer", where), n_head=_need(hf, "n_head", where),
                     d_model=d, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                     layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))


def _transpose(a):
    return a.T


def _rows(i: int, d: int, transpose: bool):
    """Rows ``i·d:(i+1)·d`` of a fused q|k|v tensor (Conv1D (d, 3d) weight or (3d,) bias)."""
    def take(a):
        a = a.T if transpose else a                 # (3d, d) or (3d,)
        return a[i * d:(i + 1) * d]
    return take


def gpt2_key_map(model) -> dict:
    """GPT-2's Conv1D stores (in, out): transpose; ``c_attn`` (d, 3d) splits into q, k, v."""
    cfg = model.config
    d = cfg.d_model
    out = {"tok_emb.weight": ("wte.weight", None), "pos_emb.weight": ("wpe.weight", None)}
    for i in range(cfg.n_layer):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for ln_src, ln_dst in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[f"{dst}{ln_dst}.weight"] = (f"{src}{ln_src}.weight", None)
            out[f"{dst}{ln_dst}.bias"] = (f"{src}{ln_src}.bias", None)
        for j, name in enumerate("qkv"):
            out[f"{dst}attn.{name}.weight"] = (f"{src}attn.c_attn.weight", _rows(j, d, True))
            out[f"{dst}attn.{name}.bias"] = (f"{src}attn.c_attn.bias", _rows(j, d, False))
        for conv, lin in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.fc1"),
                          ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{lin}.weight"] = (f"{src}{conv}.weight", _transpose)
            out[f"{dst}{lin}.bias"] = (f"{src}{conv}.bias", None)
    out["ln_f.weight"] = ("ln_f.weight", None)
    out["ln_f.bias"] = ("ln_f.bias", None)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", None)
    return out


def gpt2_ignored(cfg: GPTConfig):
    """Foreign keys that are buffers, not parameters (older files save the causal mask), and
    the head when it is tied to ``wte``."""
    pattern = r"h\.\d+\.attn\.(bias|masked_bias)"
    return re.compile(pattern + ("|lm_head\\.weight" if cfg.tie_embeddings else ""))


# --- BERT -----------------------------------------------------------------------------------

def bert_config(hf: dict, where: str = "bert", pooler: bool = True) -> BertConfig:
    _unsupported(hf, where, position_embedding_type=("absolute",), is_decoder=(False,),
                 add_cross_attention=(False,))
    act = hf.get("hidden_act", "gelu")
    if act not in GELU_OF_ACT:
        raise ValueError(f"{where}: config.json field 'hidden_act' = {act!r} is not supported "
                         f"(lowrank implements {sorted(GELU_OF_ACT)})")
    return BertConfig(vocab_size=_need(hf, "vocab_size", where),
                      hidden_size=_need(hf, "hidden_size", where),
                      num_hidden_layers=_need(hf, "num_hidden_layers", where),
                      num_attention_heads=_need(hf, "num_attention_heads", where),
                      intermediate_size=_need(hf, "intermediate_size", where),
                      max_position_embeddings=hf.get("max_position_embeddings", 512),
                      type_vocab_size=hf.get("type_vocab_size", 2),
                      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                      hidden_act=act, pooler=pooler, pad_token_id=hf.get("pad_token_id", 0))


def bert_key_map(model) -> dict:
    """The names are the checkpoint's own: identity (old files' LayerNorm gamma/beta are
    renamed by the loader, as transformers does)."""
    return {name: (name, None) for name, _ in model.named_parameters()}


def bert_ignored(cfg: BertConfig):
    return re.compile(r"embeddings\.position_ids|embeddings\.token_type_ids")


def rename_legacy(key: str) -> str:
    """Old TF-converted BERT files call LayerNorm's parameters gamma/beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                  re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
