"""``lowrank finetune --quantize keep`` over a tiny GGUF base and ``lowrank export`` of the
result (docs/export.md): the run records the kept base, loading the fine-tune keeps it again,
the export says what merging and re-quantising did, and a second export to the same path is
one error line with the first file untouched."""
import numpy as np
import pytest

from lowrank import backend
from lowrank.quant import GGUFBlocksParameter

from tests.helpers.gguf_writer import T, write_tiny_gguf  # noqa: E402  (skips without gguf)


def test_finetune_keep_then_export(tmp_path, capsys):
    from lowrank.app import workflows as wf
    from lowrank.app.cli import main
    base = tmp_path / "tiny.gguf"
    write_tiny_gguf(base, types={"attn_q.weight": T.Q8_0, "attn_v.weight": T.Q4_0,
                                 "ffn_up.weight": T.Q4_1},
                    shape={"hidden": 64, "ffn": 96, "heads": 2, "kv_heads": 1})
    corpus = tmp_path / "c.txt"
    corpus.write_text("the sea is near the shore and the rain is here " * 100)
    assert main(["finetune", "--base", str(base), "--out", str(tmp_path / "ft"), "--variant",
                 "lora", "--targets", "q_proj,v_proj,up_proj", "--r", "2", "--steps", "2",
                 "--warmup", "1", "--batch-size", "2", "--corpus", str(corpus),
                 "--no-progress", "--quantize", "keep"]) == 0
    assert wf.read_run(tmp_path / "ft")["quantize"] == "keep"
    model, _ = wf.load_finetuned(base, tmp_path / "ft")
    kept = [n for n, p in model.named_parameters() if isinstance(p, GGUFBlocksParameter)]
    assert sorted(kept) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                                  ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"))
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    assert main(["export", "--model", str(base), "--adapter", str(tmp_path / "ft"), "--out",
                 str(out), "--format", "gguf", "--type", "Q8_0"]) == 0
    said = capsys.readouterr().out
    assert "dequantised exactly as stored; merged the adapter in float32" in said
    assert "re-quantised the merged weights to Q8_0: weight error rms" in said
    size = out.stat().st_size
    assert main(["export", "--model", str(base), "--adapter", str(tmp_path / "ft"), "--out",
                 str(out), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists already" in err and "\n" not in err and out.stat().st_size == size
    import lowrank as lr
    ids = backend.asarray(np.arange(12).reshape(2, 6) + 3)
    wf_model = lr.adapters.merge_and_unload(model)
    mine = backend.to_numpy(wf_model.forward(ids)[0])
    back = backend.to_numpy(lr.from_pretrained(out).forward(ids)[0])
    assert 0 < float(np.abs(back - mine).max() / np.abs(mine).max()) < 2e-2   # Q8_0's cost
