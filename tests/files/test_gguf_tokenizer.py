"""The tokenizer of a GGUF file's metadata: the same tokenizer and the same ids as
transformers builds from the same file; the fields it needs refused by name."""
import json

import numpy as np
import pytest

pytest.importorskip("gguf")
from tests.helpers.gguf_writer import CONTROL_TOKENS, write_tiny_gguf  # noqa: E402

import lowrank as lr  # noqa: E402

TEXTS = ["the hat is in the shoe", "  two  spaces\n\nand\ttabs ",
         "<|im_start|>user\nhi<|im_end|>", "émoji 😀 中文 ☃",
         "<|endoftext|><|endoftext|>tail", "", "x" * 300, "it's 12345 o'clock"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_special_tokens_and_pad(tiny):
    tok = lr.Tokenizer.from_pretrained(tiny)
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert tok.pad_id == 2 and tok.special_id("eos_token") == 2
    for i, token in enumerate(CONTROL_TOKENS):   # control tokens stay whole
        assert tok.encode(f"a{token}b").tolist()[1] == i


def test_decode_inverts_encode(tiny):
    tok = lr.Tokenizer.from_pretrained(tiny)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_same_ids_as_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tiny.parent), gguf_file=tiny.name)
    ours = lr.Tokenizer.from_pretrained(tiny)
    a, b = json.loads(ours.hf.to_str()), json.loads(theirs.backend_tokenizer.to_str())
    for key in ("model", "pre_tokenizer", "decoder", "added_tokens", "normalizer"):
        assert a[key] == b[key], key
    rng = np.random.default_rng(0)
    alphabet = list("the sahinor'\n\t 1234😀é") + CONTROL_TOKENS
    texts = TEXTS + ["".join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(50)]
    for text in texts:
        assert ours.encode(text).tolist() == theirs(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("field,value,match", [
    ("tokenizer.ggml.model", "llama", "'tokenizer.ggml.model' = 'llama' is not supported"),
    ("tokenizer.ggml.merges", None, "'tokenizer.ggml.merges' is missing"),
    ("tokenizer.ggml.merges", ["a b c"], "'tokenizer.ggml.merges' holds 'a b c'"),
    ("tokenizer.ggml.tokens", None, "'tokenizer.ggml.tokens' is missing"),
    ("tokenizer.ggml.bos_token_id", 9999, "'tokenizer.ggml.bos_token_id' = 9999 is not a token"),
    ("tokenizer.ggml.token_type", [1, 1], "'tokenizer.ggml.token_type' has 2 entries"),
])
def test_bad_fields(tmp_path, field, value, match):
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, tokenizer={field: value})
    with pytest.raises(ValueError, match=match) as info:
        lr.Tokenizer.from_pretrained(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
