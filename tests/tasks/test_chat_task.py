"""The chat task end to end on a tiny GGUF Llama: fine-tune, save, load, score; every
registered variant trains; resume after a kill is bit-identical."""
import json

import numpy as np
import pytest

import lowrank as lr
from lowrank.files.storage import read_safetensors
from lowrank.tasks import chat, chat_io
from tests.helpers.gguf_writer import write_tiny_gguf


def conversations(n):
    lines = []
    for i in range(n):
        word = "ab"[i % 2]
        if i % 3:
            lines.append({"prompt": f"say {word}", "completion": word * 3})
        else:
            lines.append({"messages": [{"role": "system", "content": "hi"},
                                       {"role": "user", "content": f"say {word}"},
                                       {"role": "assistant", "content": word * 3}]})
    return lines


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    write_tiny_gguf(root / "tiny.gguf", shape=dict(hidden=32, ffn=64))
    for name, n in (("train.jsonl", 12), ("val.jsonl", 4)):
        (root / name).write_text("".join(json.dumps(c) + "\n" for c in conversations(n)))
    return root


def run(files, out, variant="lora", **kw):
    config = chat.ChatConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-2,
                                "max_new_tokens": 4, **kw.pop("config", {})})
    return chat_io.finetune(out, files / "tiny.gguf", variant, config, files / "train.jsonl",
                            files / "val.jsonl", progress=False, say=lambda *_: None, **kw)


def test_finetune_lowers_the_loss_and_saves(files, tmp_path):
    rows = []
    result = run(files, tmp_path / "out", accuracy=True, on_epoch=lambda e, r: rows.append(r),
                 config={"epochs": 3})
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert rows[-1]["val_perplexity"] == pytest.approx(np.exp(rows[-1]["val_loss"]))
    assert 0 <= rows[-1]["val_accuracy"] <= 1 and rows[-1]["val_count"] == 4
    assert result["tokens_per_s"] > 0
    scored = chat_io.evaluate_file(files / "val.jsonl", tmp_path / "out", accuracy=True)
    assert scored["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    assert scored["accuracy"] == rows[-1]["val_accuracy"]
    base = chat_io.evaluate_file(files / "val.jsonl", base=files / "tiny.gguf")
    assert base["loss"] > scored["loss"]


def test_steps_caps_the_run(files, tmp_path):
    result = run(files, tmp_path / "out", config={"steps": 2})
    assert result["trainer"].step == 2 and len(result["info"]["epochs"]) == 1


@pytest.mark.parametrize("variant", lr.adapters.available())
def test_every_variant_trains(files, tmp_path, variant):
    options = {"relora": {"reset_interval": 2, "restart_warmup": 1},
               "increlora": {"init_warmup": 1, "incre_interval": 1},
               "adalora": {"init_r": 4, "target_r": 2}}.get(variant, {})
    result = run(files, tmp_path / "out", variant, options=options,
                 config={"epochs": 1, "lr": 5e-3})
    assert np.isfinite(result["info"]["epochs"][-1]["val_loss"])
    model, _, _, info = chat_io.load(tmp_path / "out")
    assert info["variant"] == variant
    assert lr.adapters.adapted_modules(model)


def test_loraplus_trains(files, tmp_path):
    result = run(files, tmp_path / "out", config={"epochs": 1, "loraplus_lr_ratio": 16.0})
    assert np.isfinite(result["info"]["epochs"][-1]["train_loss"])


@pytest.mark.parametrize("shards", [1, 2])
def test_resume_after_a_kill_is_bit_identical(files, tmp_path, monkeypatch, shards):
    opts = {"options": {"dropout": 0.1}, "save_every": 2, "config": {"shards": shards}}
    whole = run(files, tmp_path / "whole", **dict(opts))
    real = chat_io.check_update

    def killed(trainer, saved=None):
        if trainer.step == 5:
            raise KeyboardInterrupt("killed")
        return real(trainer, saved)

    monkeypatch.setattr(chat_io, "check_update", killed)
    with pytest.raises(KeyboardInterrupt):
        run(files, tmp_path / "cut", **dict(opts))
    monkeypatch.setattr(chat_io, "check_update", real)
    resumed = run(files, tmp_path / "cut", **dict(opts), resume=True)
    assert resumed["trainer"].step == whole["trainer"].step == 6
    a = read_safetensors(tmp_path / "whole" / "adapter_model.safetensors")
    b = read_safetensors(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in whole["info"]["history"]] == \
        [h["loss"] for h in resumed["info"]["history"]]


def test_resume_without_state_is_an_error(files, tmp_path):
    run(files, tmp_path / "out", config={"epochs": 1})   # epoch saves carry the state
    with pytest.raises(ValueError, match="chat directory|training state"):
        run(files, tmp_path / "empty", resume=True)


def test_shards_split_the_batches_and_are_recorded(files, tmp_path, monkeypatch):
    from lowrank.parallel import BatchShards
    seen, real = [], BatchShards.loss_backward

    def spy(self, parts, dloss=1.0):
        seen.append([n for n, _ in parts])
        return real(self, parts, dloss)
    monkeypatch.setattr(BatchShards, "loss_backward", spy)
    result = run(files, tmp_path / "out", config={"steps": 2, "shards": 2})
    assert len(seen) == 2 and all(len(parts) == 2 and min(parts) > 0 for parts in seen)
    assert result["info"]["recipe"]["shards"] == 2
    assert np.isfinite(result["info"]["epochs"][-1]["train_loss"])
    with pytest.raises(ValueError, match="shards"):
        chat.ChatConfig(shards=0)


def test_chat_trains_over_a_base_kept_in_its_gguf_blocks(tmp_path):
    """``quantize="keep"``: the adapters train over the file's Q8_0/Q4_0 blocks, the run
    records it, and loading the directory puts the base back in its blocks: the same loss."""
    from lowrank.quant import GGUFBlocksParameter
    from tests.helpers.gguf_writer import T
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, shape=dict(hidden=64, ffn=96, heads=2, kv_heads=1),
                    types={"attn_q.weight": T.Q8_0, "ffn_down.weight": T.Q4_0})
    for name, n in (("train.jsonl", 8), ("val.jsonl", 4)):
        (tmp_path / name).write_text("".join(json.dumps(c) + "\n" for c in conversations(n)))
    config = chat.ChatConfig(epochs=1, batch_size=4, lr=1e-2, max_new_tokens=4)
    result = chat_io.finetune(tmp_path / "out", path, "lora", config, tmp_path / "train.jsonl",
                              tmp_path / "val.jsonl", progress=False, say=lambda *_: None,
                              quantize="keep")
    kept = [m for m in (m for _, m in result["model"].named_modules()) if isinstance(getattr(m, "weight", None),
                                                               GGUFBlocksParameter)]
    assert len(kept) == 2 * 2 and result["info"]["quantize"] == "keep"   # 2 layers x q, down
    assert np.isfinite(result["info"]["epochs"][-1]["val_loss"])
    model, _, _, info = chat_io.load(tmp_path / "out")
    assert sum(isinstance(getattr(m, "weight", None), GGUFBlocksParameter)
               for _, m in model.named_modules()) == len(kept)
    again = chat_io.evaluate_file(tmp_path / "val.jsonl", tmp_path / "out")
    assert again["loss"] == pytest.approx(result["info"]["epochs"][-1]["val_loss"], rel=1e-6)
