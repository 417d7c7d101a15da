"""Bad Hugging Face directories: each a ValueError naming the key or the file, and one line
(no traceback) from the CLI; the CLI takes a Hugging Face GPT-2 directory as a base model."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrank as lr
from lowrank.app import cli

from tests.models.test_pretrained import save_bert, save_gpt2

transformers = pytest.importorskip("transformers")


@pytest.fixture
def bert_dir(tmp_path):
    save_bert(tmp_path / "bert")
    return tmp_path / "bert"


def rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_unknown_model_type(bert_dir):
    config = json.loads((bert_dir / "config.json").read_text())
    config["model_type"] = "t5"
    (bert_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown model_type 't5'"):
        lr.from_pretrained(bert_dir)


def test_missing_tensor(bert_dir):
    rewrite(bert_dir, lambda t: t.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(ValueError, match="missing key 'encoder.layer.1.output.dense.bias'"):
        lr.from_pretrained(bert_dir)


def test_extra_tensor(bert_dir):
    rewrite(bert_dir, lambda t: t.update({"encoder.layer.0.surprise": np.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected key 'encoder.layer.0.surprise'"):
        lr.from_pretrained(bert_dir)


def test_wrong_shape(bert_dir):
    def edit(t):
        t["encoder.layer.0.attention.self.query.weight"] = np.zeros((16, 15))
    rewrite(bert_dir, edit)
    with pytest.raises(ValueError, match=r"shape mismatch for key "
                                         r"'encoder.layer.0.attention.self.query.weight'"):
        lr.from_pretrained(bert_dir)


def test_wrong_shape_in_a_split_gpt2_tensor(tmp_path):
    save_gpt2(tmp_path)
    def edit(t):
        t["transformer.h.0.attn.c_attn.bias"] = np.zeros(47)
    rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match="shape mismatch for key 'h.0.attn.c_attn.bias'"):
        lr.from_pretrained(tmp_path)


def test_corrupt_safetensors_header(bert_dir):
    path = bert_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"{not json..."
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors"):
        lr.from_pretrained(bert_dir)


def test_unsupported_config_field(bert_dir):
    config = json.loads((bert_dir / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (bert_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="position_embedding_type"):
        lr.from_pretrained(bert_dir)


def test_shard_missing_from_index(tmp_path):
    save_bert(tmp_path, max_shard_size="4KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(ValueError, match=shard):
        lr.from_pretrained(tmp_path)


def test_lr_load_points_a_hugging_face_directory_to_from_pretrained(bert_dir):
    with pytest.raises(ValueError, match="lr.from_pretrained"):
        lr.load(bert_dir)


def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="not a model directory"):
        lr.from_pretrained(tmp_path / "nowhere")


def gpt2_with_tokenizer(path):
    tok = lr.text.tokenizer.train_tokenizer("def f(x):\n    return x + 1\n" * 40, 260)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=16, n_embd=16,
                                  n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


def test_cli_generate_and_finetune_take_a_gpt2_directory(tmp_path, capsys):
    base = gpt2_with_tokenizer(tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def g(y):\n    return y * 2\n" * 200)
    assert cli.main(["generate", "--model", str(base), "--prompt", "def", "--max-new-tokens",
                     "4"]) == 0
    assert capsys.readouterr().out.startswith("def")
    assert cli.main(["finetune", "--base", str(base), "--out", str(tmp_path / "ft"),
                     "--variant", "lora", "--targets", "q,v", "--r", "2", "--steps", "2",
                     "--batch-size", "2", "--no-progress", "--corpus", str(corpus)]) == 0
    assert "lora:" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(base), "--adapter", str(tmp_path / "ft"),
                     "--prompt", "def", "--max-new-tokens", "3"]) == 0


def test_cli_bad_directory_is_one_line(tmp_path, bert_dir, capsys):
    rewrite(bert_dir, lambda t: t.pop("pooler.dense.bias"))
    assert cli.main(["generate", "--model", str(bert_dir), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "missing key 'pooler.dense.bias'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    save_bert(tmp_path / "ok")
    assert cli.main(["generate", "--model", str(tmp_path / "ok"), "--prompt", "x"]) == 2
    assert "no language-model head" in capsys.readouterr().err
