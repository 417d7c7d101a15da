"""The one reader for labelled text: every format, its columns and header, its bad inputs."""
import json

import pytest

from lowrank.text.datasets import SENTIMENT_LABELS
from lowrank.tasks.data_files import format_of, iter_examples, read_examples
from lowrank.tasks.text_data import sentiment_split


def _write(path, content, mode="w"):
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _pairs(examples):
    return [(e.text, e.label) for e in examples]


def test_tsv_without_and_with_header(tmp_path):
    plain = read_examples(_write(tmp_path / "a.tsv", "good film\t1\nbad\t0\n\n"))
    assert _pairs(plain) == [("good film", "1"), ("bad", "0")]
    assert plain[1].source.endswith("a.tsv:2")
    headed = read_examples(_write(tmp_path / "b.tsv", "text\tlabel\ngood\tpos\nbad\tneg\n"))
    assert _pairs(headed) == [("good", "pos"), ("bad", "neg")]        # no class "label"
    swapped = read_examples(_write(tmp_path / "c.tsv", "label\tsentence\npos\tgood\n"))
    assert _pairs(swapped) == [("good", "pos")]
    assert read_examples(_write(tmp_path / "d.tsv", "a\tb\t1\n"))[0].text == "a\tb"  # last tab
    named = read_examples(_write(tmp_path / "e.tsv", "id\tbody\ty\n7\tnice\t1\n"),
                          text_column="body", label_column="y")
    assert _pairs(named) == [("nice", "1")]
    forced = read_examples(_write(tmp_path / "f.tsv", "text\tlabel\n"), header=False)
    assert _pairs(forced) == [("text", "label")]


@pytest.mark.parametrize("content, message", [
    ("no tab here\n", "a.tsv:1: no tab"),
    ("x\t1\n\t1\n", "a.tsv:2: empty text"),
    ("x\t1\ny\t \n", "a.tsv:2: empty label"),
    ("", "empty file"),
    ("a,1\n", "a CSV file? pass --format csv"),
])
def test_tsv_bad_inputs(tmp_path, content, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        read_examples(_write(tmp_path / "a.tsv", content))


def test_tsv_not_utf8_names_the_line(tmp_path):
    path = _write(tmp_path / "a.tsv", b"ok\t1\nbad \xff\t0\n", mode="wb")
    with pytest.raises(ValueError, match=r"a.tsv:2: not UTF-8 text \(byte 0xff\)"):
        read_examples(path)


def test_tsv_missing_column_and_short_row(tmp_path):
    with pytest.raises(ValueError, match=r"no column 'body'; the header has \['text', 'label'\]"):
        read_examples(_write(tmp_path / "a.tsv", "text\tlabel\nx\t1\n"), text_column="body")
    with pytest.raises(ValueError, match=r"b.tsv:3: 2 fields, expected at least 3"):
        read_examples(_write(tmp_path / "b.tsv", "id\ttext\tlabel\n1\tx\t1\n2\ty\n"))


def test_csv_header_quoting_and_multiline(tmp_path):
    path = _write(tmp_path / "a.csv", 'id,text,label\n1,"good, really",pos\n'
                                      '2,"said ""no""\nthen left",neg\n')
    examples = read_examples(path)
    assert _pairs(examples) == [("good, really", "pos"), ('said "no"\nthen left', "neg")]
    assert examples[1].source.endswith("a.csv:4")        # the line the record ends on
    no_header = read_examples(_write(tmp_path / "b.csv", '"hello, you",1\nbye,0\n'))
    assert _pairs(no_header) == [("hello, you", "1"), ("bye", "0")]


@pytest.mark.parametrize("content, message", [
    ('text,label\n"open quote,1\n', "bad CSV"),
    ("text,label\nx\n", "a.csv:2: 1 fields"),
    ("justonefield\n", "a.csv:1: one field"),
    ("text,label\n,1\n", "a.csv:2: empty text"),
])
def test_csv_bad_inputs(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        read_examples(_write(tmp_path / "a.csv", content))


def test_jsonl_lines_and_array(tmp_path):
    lines = '{"text": "good", "label": 1}\n\n{"sentence": "bad", "label": "neg"}\n'
    assert _pairs(read_examples(_write(tmp_path / "a.jsonl", lines))) == [("good", "1"),
                                                                          ("bad", "neg")]
    array = json.dumps([{"review": "fine", "y": 0}])
    assert _pairs(read_examples(_write(tmp_path / "b.json", array), label_column="y")) == [
        ("fine", "0")]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": 1}\n{"text": "b", "label": \n', r"a.jsonl:2: not JSON"),
    ('"just a string"\n', r"a.jsonl:1: expected an object"),
    ('{"text": "a"}\n', r"a.jsonl:1: no label field among \['text'\]"),
    ('{"text": "a", "label": true}\n', "the label is bool"),
    ('{"text": 3, "label": 1}\n', "the text is int"),
    ('{"text": "a", "label": -1}\n', "negative label"),
])
def test_jsonl_bad_inputs(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        read_examples(_write(tmp_path / "a.jsonl", content))


def test_label_names_and_limit(tmp_path):
    path = _write(tmp_path / "a.tsv", "x\t0\ny\t1\nz\t1\n")
    named = read_examples(path, label_names=["negative", "positive"], limit=2)
    assert _pairs(named) == [("x", "negative"), ("y", "positive")]
    with pytest.raises(ValueError, match=r"b.tsv:1: label 2 has no name"):
        read_examples(_write(tmp_path / "b.tsv", "x\t2\n"), label_names=["a", "b"])
    with pytest.raises(ValueError, match="limit must be an integer >= 1"):
        read_examples(path, limit=0)


def test_streaming_reads_only_what_it_needs(tmp_path):
    path = _write(tmp_path / "a.tsv", "x\t0\n" + "no tab\n")
    first = next(iter_examples(path))      # the bad second line is not reached
    assert first.text == "x"
    assert len(read_examples(path, limit=1)) == 1


def test_format_by_extension_and_flag(tmp_path):
    assert format_of(tmp_path / "a.CSV") == "csv"
    assert format_of(tmp_path / "a.ndjson") == "jsonl"
    with pytest.raises(ValueError, match=r"cannot tell the format .*\.dat; pass --format"):
        format_of(tmp_path / "a.dat")
    with pytest.raises(ValueError, match="unknown data format 'xml'"):
        format_of(tmp_path / "a.tsv", "xml")
    path = _write(tmp_path / "a.dat", "text,label\nhi,1\n")
    assert _pairs(read_examples(path, format="csv")) == [("hi", "1")]
    with pytest.raises(ValueError, match="no such file"):
        read_examples(tmp_path / "missing.tsv")


def test_shipped_split_has_names_and_matches_the_originals():
    train, val = sentiment_split()
    for name, expected in (("sentiment:train", train), ("sentiment:val", val)):
        shipped = read_examples(name)
        assert [(e.text, e.label) for e in shipped] == [(" ".join(e.text.split()), e.label)
                                                        for e in expected]
    assert {e.label for e in train} == set(SENTIMENT_LABELS)
    assert (len(train), len(val)) == (1800, 200)
    with pytest.raises(ValueError, match=r"splits \['train', 'val'\]"):
        read_examples("sentiment:test")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["good", "bad"], "label": [1, 0]}), tmp_path / "a.parquet")
    assert _pairs(read_examples(tmp_path / "a.parquet")) == [("good", "1"), ("bad", "0")]
    pq.write_table(pa.table({"text": ["good", None], "label": [1, 0]}), tmp_path / "b.pq")
    with pytest.raises(ValueError, match=r"b.pq: row 1: the text is NoneType"):
        read_examples(tmp_path / "b.pq")
    with pytest.raises(ValueError, match=r"no label column among \['text', 'stars'\]"):
        pq.write_table(pa.table({"text": ["x"], "stars": [3]}), tmp_path / "c.parquet")
        read_examples(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="d.parquet: not a Parquet file"):
        read_examples(_write(tmp_path / "d.parquet", "text\tlabel\n"))


def test_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "one"))
    assert _pairs(read_examples(tmp_path / "one")) == [("good", "pos"), ("bad", "neg")]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two"))
    assert len(read_examples(f"{tmp_path / 'two'}#test")) == 2
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\]"):
        read_examples(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a saved dataset"):
        read_examples(tmp_path / "empty")
