"""``lowrank export`` (docs/export.md): a tiny quantized GGUF base with a LoRA adapter out as a
Hugging Face directory, a GGUF file (F32, F16, Q8_0, Q4_0, Q4_1) and a PEFT directory, each
read back by the tool that serves it (transformers, transformers' GGUF loader, PEFT, the
``gguf`` package's reader) with lowrank's merged or adapted logits; and bad input refused in
one line with nothing written."""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.app.export import export
from lowrank.files.gguf_file import open_gguf

from tests.helpers.gguf_writer import T, TINY, write_tiny_gguf  # noqa: E402  (skips without gguf)

gguf = pytest.importorskip("gguf")
TYPES = {"attn_q.weight": T.Q8_0, "attn_k.weight": T.Q4_0, "ffn_up.weight": T.Q4_1,
         "token_embd.weight": T.Q8_0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(base path, adapter dir, merged model, adapted model)`` of a tiny Q8_0/Q4_x base."""
    root = tmp_path_factory.mktemp("export")
    base = root / "tiny.gguf"
    write_tiny_gguf(base, types=TYPES, tied=True)
    model = lr.from_pretrained(base)
    lr.adapters.inject(model, lr.adapters.config("lora", r=4, alpha=8.0),
                       ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], seed=1)
    rng = np.random.default_rng(2)
    for p in model.parameters(trainable_only=True):
        p.data += backend.asarray(0.05 * rng.standard_normal(p.shape), dtype=p.dtype)
    adapter = root / "adapter"
    lr.save_pretrained(model, adapter)
    return base, adapter, model


def _ids():
    return np.random.default_rng(0).integers(3, TINY["vocab"], size=(3, 11))


def _logits(model):
    out, _ = model.forward(backend.asarray(_ids()))
    return backend.to_numpy(out)


def _hf_logits(hf):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return hf(torch.tensor(_ids())).logits.numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_hf_directory_loads_in_transformers_with_the_merged_logits(trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    base, adapter, model = trained
    report = export(base, adapter, tmp_path / "hf", "hf")
    assert any("dequantised exactly" in n and "merged the adapter in float32" in n
               for n in report["notes"])
    ours = _logits(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert _rel(_hf_logits(hf), ours) < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert lr.Tokenizer.from_pretrained(base).encode("the sea") .tolist() == \
        tok("the sea")["input_ids"]


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_file_opens_in_the_gguf_reader_and_transformers(trained, tmp_path, qtype):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    base, adapter, model = trained
    out = tmp_path / f"m.{qtype}.gguf"
    report = export(base, adapter, out, "gguf", qtype)
    reader = gguf.GGUFReader(str(out))
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert kinds == {qtype}
    assert str(bytes(reader.fields["tokenizer.chat_template"].parts[-1]), "utf-8") == \
        str(bytes(gguf.GGUFReader(str(base)).fields["tokenizer.chat_template"].parts[-1]),
            "utf-8")
    opened = open_gguf(out)   # lowrank's own reader: every check passes
    assert opened.config["tie_word_embeddings"] is True
    ours = _logits(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    err = _rel(_hf_logits(hf), ours)
    if qtype == "F32":
        assert err < 1e-5 and any("no re-quantisation" in n for n in report["notes"])
    else:
        assert any(f"re-quantised the merged weights to {qtype}" in n for n in report["notes"])
        bound = {"F16": 1e-3, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}[qtype]
        assert 0 < report["relative_rms_error"] and err < bound
        # lowrank reading the file back gives the same logits as transformers
        assert _rel(_logits(lr.from_pretrained(out)), _hf_logits(hf)) < 1e-5


def test_peft_directory_gives_the_adapted_logits_in_transformers_and_peft(trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, adapter, model = trained
    export(base, adapter, tmp_path / "peft", "peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(base.parent), gguf_file=base.name, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "peft")
    assert _rel(_hf_logits(adapted), _logits(model)) < 1e-5


def test_bad_input_is_one_line_and_nothing_is_written(trained, tmp_path):
    base, adapter, _ = trained
    (tmp_path / "taken").mkdir()
    for fmt in ("hf", "gguf", "peft"):
        with pytest.raises(ValueError, match="exists already"):
            export(base, adapter, tmp_path / "taken", fmt)
    with pytest.raises(ValueError, match="format must be one of"):
        export(base, adapter, tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="--type must be one of"):
        export(base, adapter, tmp_path / "x.gguf", "gguf", "Q6_K")
    odd = tmp_path / "odd.gguf"      # rows of 48: not whole Q8_0 blocks of 32 on export
    write_tiny_gguf(odd, shape={"hidden": 48, "ffn": 64, "heads": 2, "kv_heads": 1})
    with pytest.raises(ValueError, match="not a whole number of Q8_0 blocks"):
        export(odd, None, tmp_path / "odd.q8.gguf", "gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf", "taken"]


def test_a_gguf_whose_blocks_disagree_with_its_shapes_is_refused(tmp_path):
    import struct
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    write_tiny_gguf(good, types={"token_embd.weight": T.Q8_0})
    data = bytearray(good.read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    assert struct.unpack("<IQQ", data[at:at + 20]) == (2, TINY["hidden"], TINY["vocab"])
    data[at + 4:at + 12] = struct.pack("<Q", 240)   # rows of 240: 7.5 Q8_0 blocks
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a multiple of Q8_0 block size|not a whole "
                       "number of Q8_0 blocks") as info:
        open_gguf(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
