"""Offline corpora, the byte-level BPE tokenizer, and the train/validation token stream."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.text import corpus as data, tokenizer
from lowrank.text.corpus import TokenData
from lowrank.text.tokenizer import Tokenizer, train_tokenizer

# --- corpora ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs():
    return data.docs_corpus()


def test_docs_corpus_nonempty_and_deterministic(docs):
    assert len(docs) > 100_000
    assert "if_stmt" in docs or "if" in docs
    assert data.docs_corpus() == docs
    assert data.corpus("docs") == docs


def test_code_corpus_bounded_deterministic_on_file_boundaries():
    code = data.code_corpus(max_bytes=300_000)
    assert 0 < len(code.encode("utf-8")) <= 300_000
    assert code == data.code_corpus(max_bytes=300_000)
    assert code.startswith("# file: ")
    assert code.endswith("\n\n")
    files = re.findall(r"^# file: (.*)$", code, flags=re.M)
    assert files == sorted(files)            # sorted paths
    assert not any(re.search(r"(^|/)(tests?|site-packages)/", f) for f in files)
    # a bigger budget only adds files
    assert len(data.code_corpus(max_bytes=600_000)) > len(code)
    assert data.corpus("code", max_bytes=300_000) == code


def test_code_corpus_rejects_bad_budget():
    with pytest.raises(ValueError, match="max_bytes"):
        data.code_corpus(max_bytes=0)


def test_read_text_files_and_dispatch(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("héllo\n", encoding="utf-8")
    b.write_text("world", encoding="utf-8")
    assert data.read_text_files([a]) == "héllo\n"
    assert data.read_text_files([a, b]) == "héllo\n\nworld"
    assert data.corpus([str(a), b]) == "héllo\n\nworld"
    assert data.corpus(str(a)) == "héllo\n"
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.read_text_files([a, missing])
    with pytest.raises(ValueError, match="unknown corpus"):
        data.corpus("wikipedia")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bad.bin"):
        data.read_text_files([bad])


# --- tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer(docs[:200_000], 512)


def test_tokenizer_vocab_and_ids(tok, docs):
    assert tok.vocab_size == 512
    ids = tok.encode(docs[:5000])
    assert ids.dtype in (np.int32, np.int64) and ids.ndim == 1
    assert 0 <= ids.min() and ids.max() < 512
    assert len(ids) < 5000                      # merges compress the text
    assert tok.decode(ids) == docs[:5000]
    assert tok.encode("").size == 0 and tok.decode([]) == ""


@given(st.text(max_size=300))
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=25)
@given(st.text(alphabet=st.sampled_from(list("ab \n\t\r\x0b\x1c\u2028\u00a0'sé1.")), max_size=200),
       st.integers(1, 12))
def test_chunked_encode_equals_whole_encode(tok, text, size):
    """Long texts are cut into pieces before encoding; the ids must not change."""
    pieces = list(tokenizer._safe_chunks(text, size))
    assert "".join(pieces) == text
    whole = tok.hf.encode(text, add_special_tokens=False).ids
    parts = [i for p in pieces for i in tok.hf.encode(p, add_special_tokens=False).ids]
    assert parts == whole


def test_long_text_encode_is_exact(tok, docs, monkeypatch):
    monkeypatch.setattr(tokenizer, "_ENCODE_CHUNK_CHARS", 1000)
    text = docs[:50_000]
    ids = tok.encode(text)
    assert ids.tolist() == tok.hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_tokenizer_training_is_deterministic(docs, tok):
    again = train_tokenizer(docs[:200_000], 512)
    assert again.get_vocab() == tok.get_vocab()
    assert again.merges() == tok.merges()


def test_tokenizer_save_load(tok, tmp_path, docs):
    path = tok.save(tmp_path / "tokenizer.json")
    assert path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    text = docs[10_000:12_000]
    assert np.array_equal(loaded.encode(text), tok.encode(text))
    assert Tokenizer.load(tmp_path).vocab_size == 512          # a directory works too
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")


def test_tokenizer_rejects_bad_arguments(tok):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("some text", 100)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer("", 512)
    with pytest.raises(ValueError, match="ids must be"):
        tok.decode([0, 512])


# --- TokenData -----------------------------------------------------------------------------


def _covers_window(segments, start, length):
    return bool(np.any((segments[:, 0] <= start) & (start + length <= segments[:, 1])))


def test_split_is_deterministic_disjoint_and_complete():
    ids = np.arange(10_000)
    a, b = TokenData(ids, context=16), TokenData(ids, context=16)
    for split in ("train", "val"):
        assert np.array_equal(a.segments(split), b.segments(split))
    marks = np.zeros(10_000, dtype=int)
    for split in ("train", "val"):
        for s, e in a.segments(split):
            marks[s:e] += 1
    assert np.all(marks == 1)                     # every token in exactly one split
    frac = a.num_tokens("val") / 10_000
    assert 0.05 <= frac <= 0.15
    # validation is spread over the stream, not only its tail
    val = a.segments("val")
    assert val[0, 0] < 5_000 and val[-1, 1] > 5_000


def test_batches_stay_inside_one_split():
    ids = np.arange(5_000)
    td = TokenData(ids, context=8, val_fraction=0.2)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        x, y = td.batch(split, 64, rng)
        assert x.shape == y.shape == (64, 8) and x.dtype == y.dtype == np.int64
        assert np.array_equal(y[:, :-1], x[:, 1:])
        assert np.array_equal(y, x + 1)           # ids are positions: y is x shifted by one
        segs = td.segments(split)
        assert all(_covers_window(segs, int(row[0]), 9) for row in x)


def test_batch_is_a_function_of_the_rng_state():
    td = TokenData(np.arange(3_000) % 97, context=10)
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(3):
        for a, b in zip(td.batch("train", 4, g1), td.batch("train", 4, g2)):
            assert np.array_equal(a, b)
    state = g1.bit_generator.state
    g3 = np.random.Generator(np.random.PCG64())
    g3.bit_generator.state = state
    assert np.array_equal(td.batch("train", 4, g1)[0], td.batch("train", 4, g3)[0])


def test_eval_batches_deterministic_and_non_overlapping():
    td = TokenData(np.arange(4_000), context=12)
    first = list(td.eval_batches("val", 5))
    again = list(td.eval_batches("val", 5))
    assert len(first) == len(again) > 0
    for (x1, y1), (x2, y2) in zip(first, again):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    xs = np.concatenate([x for x, _ in first])
    assert len(xs) == len(td.eval_starts("val"))
    targets = np.concatenate([y for _, y in first]).ravel()
    assert len(np.unique(targets)) == targets.size   # each target token scored once
    segs = td.segments("val")
    assert all(_covers_window(segs, int(row[0]), 13) for row in xs)
    assert len(list(td.eval_batches("val", 5, max_batches=2))) == min(2, len(first))
    assert all(x.shape[0] <= 5 for x, _ in first)


@settings(max_examples=30)
@given(st.integers(1, 40), st.integers(0, 3000), st.sampled_from([0.0, 0.05, 0.1, 0.5]))
def test_token_data_invariants(context, extra, val_fraction):
    need = (context + 1) * (2 if val_fraction else 1)
    n = need + extra
    td = TokenData(np.arange(n), context=context, val_fraction=val_fraction)
    splits = ("train", "val") if val_fraction else ("train",)
    total = 0
    for split in splits:
        assert td.num_windows(split) >= 1
        total += td.num_tokens(split)
        x, y = td.batch(split, 3, np.random.default_rng(context))
        assert all(_covers_window(td.segments(split), int(r[0]), context + 1) for r in x)
    assert total == n


def test_too_small_or_empty_corpus_raises():
    with pytest.raises(ValueError, match="empty"):
        TokenData(np.zeros(0, dtype=np.int32), context=8)
    with pytest.raises(ValueError, match="too small"):
        TokenData(np.arange(17), context=8)             # 2 * 9 = 18 needed with validation
    TokenData(np.arange(18), context=8)
    td = TokenData(np.arange(9), context=8, val_fraction=0.0)   # train only
    with pytest.raises(ValueError, match="no validation"):
        td.batch("val", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="too small"):
        TokenData(np.arange(8), context=8, val_fraction=0.0)
    with pytest.raises(ValueError, match="context"):
        TokenData(np.arange(100), context=0)
    with pytest.raises(ValueError, match="val_fraction"):
        TokenData(np.arange(100), context=4, val_fraction=1.0)
    with pytest.raises(ValueError, match="split"):
        TokenData(np.arange(100), context=4).batch("test", 1, np.random.default_rng(0))


def test_tokenized_docs_end_to_end(tok, docs):
    ids = tok.encode(docs[:100_000])
    td = TokenData(ids, context=64)
    x, y = td.batch("train", 8, np.random.default_rng(0))
    assert x.max() < tok.vocab_size
    assert isinstance(tok.decode(x[0]), str)
