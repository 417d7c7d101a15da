"""Tokenizers that files describe without a ``tokenizer.json`` of lowrank's own: a GGUF file's
``tokenizer.ggml.*`` metadata (byte-level BPE), and the special tokens a Hugging Face
directory's ``tokenizer_config.json`` names (docs/gguf.md#tokenizer).

A GGUF ``gpt2`` tokenizer is rebuilt as transformers rebuilds it from the same metadata, so both
give the same ids: the vocabulary (tokens the file spells outside the byte alphabet are spelled
in it), the merges in the file's order, GPT-2's byte-level pre-tokenizer (or the split regex of
the ``tokenizer.ggml.pre`` family, for the families that have their own), the tokens marked
control (type 3) added as special tokens and those marked user-defined (type 4) as plain added
tokens, matched whole in the text.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from ..files.untrusted import load_json_file

CONTROL, USER_DEFINED = 3, 4   # llama.cpp's token types
SPECIAL_ROLES = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                 "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# The split regexes of the pre-tokenizer families whose merges were learned on other splits
# than GPT-2's (llama.cpp's ``tokenizer.ggml.pre`` names them); any other family: GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}


def byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes stand for themselves, the others take
    the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _field(metadata, key, kind, where, required=True):
    value = metadata.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where}: metadata field '{key}' is missing")
        return None
    if kind is list:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where}: metadata field '{key}' is not a non-empty array")
    elif not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ValueError(f"{where}: metadata field '{key}' is not a {kind.__name__}")
    return value


def special_tokens_of_metadata(metadata: dict, where) -> dict:
    """``{bos_token: "<s>", ...}`` for the roles whose ids the metadata gives."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    out = {}
    for role, key in SPECIAL_ROLES.items():
        i = _field(metadata, f"tokenizer.ggml.{key}", int, where, required=False)
        if i is None:
            continue
        if not 0 <= i < len(tokens):
            raise ValueError(f"{where}: metadata field 'tokenizer.ggml.{key}' = {i} is not a "
                             f"token id (the vocabulary has {len(tokens)})")
        out[role] = tokens[i]
    return out


def tokenizer_from_metadata(metadata: dict, where) -> tuple[_HFTokenizer, dict]:
    """``(tokenizers.Tokenizer, special tokens by role)`` of a GGUF's ``tokenizer.ggml.*``."""
    model = _field(metadata, "tokenizer.ggml.model", str, where)
    if model != "gpt2":
        raise ValueError(f"{where}: metadata field 'tokenizer.ggml.model' = {model!r} is not "
                         "supported (supported: gpt2, byte-level BPE)")
    tokens = _field(metadata, "tokenizer.ggml.tokens", list, where)
    merges = _field(metadata, "tokenizer.ggml.merges", list, where)
    types = metadata.get("tokenizer.ggml.token_type") or []
    if types and len(types) != len(tokens):
        raise ValueError(f"{where}: metadata field 'tokenizer.ggml.token_type' has {len(types)} "
                         f"entries for {len(tokens)} tokens")
    spelling = byte_spelling()
    alphabet = set(spelling.values())
    vocab = {}
    for i, token in enumerate(tokens):
        key = token if set(token) <= alphabet else \
            "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[key] = i
    pairs = []
    for merge in merges:
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise ValueError(f"{where}: metadata field 'tokenizer.ggml.merges' holds {merge!r}, "
                             "not two tokens separated by one space")
        pairs.append(pair)
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None,
                                  continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = special_tokens_of_metadata(metadata, where)
    # control tokens spelled outside the byte alphabet are llama.cpp mislabels: adding them
    # would grow the vocabulary past the model's
    control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet]
    control += [t for t in special.values() if t not in control]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok, special


def _token_text(value):
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(directory) -> dict:
    """A Hugging Face directory's ``tokenizer_config.json`` ({} when it has none)."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return {}
    data = load_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def special_tokens_of_config(config: dict) -> dict:
    """``{bos_token: ..., eos_token: ..., unk_token: ..., pad_token: ...}`` as a
    ``tokenizer_config.json`` names them (roles it leaves out are left out)."""
    out = {}
    for role in SPECIAL_ROLES:
        text = _token_text(config.get(role))
        if text is not None:
            out[role] = text
    return out


__all__ = ["tokenizer_from_metadata", "special_tokens_of_metadata", "read_tokenizer_config",
           "special_tokens_of_config", "byte_spelling", "PRE_TOKENIZER_SPLITS",
           "TOKENIZER_CONFIG_FILE"]
