"""Adapter directories both ways with real PEFT (docs/peft.md): lowrank -> PEFT
(``save_pretrained`` then ``PeftModel.from_pretrained`` on the transformers model) and PEFT ->
lowrank (``get_peft_model`` ... ``save_pretrained`` then ``load_pretrained``), on tiny random
GPT-2 and BERT checkpoints, lowrank's own GPT (its torch twin plays the transformers model) and
the real MiniLM. Every output within 1e-5 relative in float32. Run with ``-s`` for the figures.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank as lr  # noqa: E402
from lowrank.adapters import adapted_modules  # noqa: E402
from reference.peft_files import perturb_peft, rel, twin_of  # noqa: E402
from tests.helpers.peft import (bert_out, classifier_from, classifier_out, gpt_out,  # noqa: E402
                                own_weights, randomize_adapters)

TOL = 1e-5
EFFECT = 3e-3   # the adapter moves the output by more than this (relative): the check can fail
FIGURES: dict = {}
GPT2 = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32)
BERT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            vocab_size=50, max_position_embeddings=32)


@pytest.fixture(scope="module", autouse=True)
def _report():
    torch.manual_seed(0)
    yield
    if FIGURES:
        print("\nPEFT round trips, max relative error (float32):")
        for key in sorted(FIGURES):
            print(f"  {key:58s} {FIGURES[key]:.2e}")


def note(key, err):
    FIGURES[key] = max(err, FIGURES.get(key, 0.0))
    assert err < TOL, f"{key}: {err:.2e}"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).save_pretrained(root / "gpt2")
    transformers.BertModel(transformers.BertConfig(**BERT)).save_pretrained(root / "bert")
    cls = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=3))
    cls.save_pretrained(root / "bertcls")
    cls.bert.save_pretrained(root / "bertcls_encoder")   # lr.from_pretrained reads the encoder
    own = lr.GPT(lr.GPTConfig(vocab_size=50, context=16, n_layer=2, n_head=2, d_model=16))
    lr.save(own, root / "own")
    return root


IDS = np.random.default_rng(0).integers(1, 50, size=(2, 7))
MASK = np.ones_like(IDS)
MASK[1, 5:] = 0


def hf_model(bases, kind):
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel.from_pretrained(bases / "gpt2").eval()
    if kind == "bert":
        return transformers.BertModel.from_pretrained(bases / "bert").eval()
    if kind == "bertcls":
        return transformers.BertForSequenceClassification.from_pretrained(bases / "bertcls").eval()
    own = lr.load(bases / "own")
    return twin_of(own.config.to_dict(), own_weights(own)).eval()


def lowrank_model(bases, kind):
    if kind == "bertcls":
        return classifier_from(lr.from_pretrained(bases / "bertcls_encoder"), bases / "bertcls")
    return lr.from_pretrained(bases / kind)


def outputs(kind, model, torch_model=None):
    """(lowrank output, PEFT output) on the shared batch (the torch model may be None)."""
    ours = {"gpt2": gpt_out, "own": gpt_out, "bert": bert_out, "bertcls": classifier_out}[kind]
    mine = ours(model, IDS, MASK)
    if kind == "bert":   # padded rows: lowrank leaves them zero (docs/performance.md#unpadding)
        mine = mine[MASK.astype(bool)]
    if torch_model is None:
        return mine, None
    with torch.no_grad():
        ids = torch.as_tensor(IDS)
        if kind in ("gpt2", "own"):
            out = torch_model(ids)
            ref = out if isinstance(out, torch.Tensor) else out.logits
        elif kind == "bert":
            ref = torch_model(ids, attention_mask=torch.as_tensor(MASK)).last_hidden_state
            return mine, ref.numpy()[MASK.astype(bool)]
        else:
            ref = torch_model(ids, attention_mask=torch.as_tensor(MASK)).logits
    return mine, ref.numpy()


def pruned(model):
    """An AdaLoRA pattern the allocator could have left: every other triplet masked."""
    for _, layer in adapted_modules(model):
        drop = list(range(1, layer.r, 2))
        layer.lora_E.data[drop] = 0.0
        layer.rank_pattern = [i not in drop for i in range(layer.r)]


# --- lowrank -> PEFT -> lowrank ------------------------------------------------------------------

TO_PEFT = [   # (base, variant, config fields, targets)
    ("gpt2", "lora", {}, ["q", "v", "o"]),
    ("gpt2", "lora", {"rslora": True}, ["q", "k", "v", "fc1"]),
    ("gpt2", "dora", {}, ["q", "v"]),
    ("gpt2", "adalora", {"target_r": 2}, ["q", "v", "fc2"]),
    ("gpt2", "lora", {"init": "pissa"}, ["q", "v"]),
    ("gpt2", "lora", {"init": "olora"}, ["o", "fc1"]),
    ("bert", "lora", {}, ["query", "value"]),
    ("bert", "lora", {"rslora": True}, ["query", "key", "value", "attention.output.dense"]),
    ("bert", "dora", {}, ["value", "intermediate.dense"]),
    ("bert", "adalora", {"target_r": 2}, ["query", "value"]),
    ("bert", "lora", {"init": "pissa"}, ["query", "value"]),
    ("bert", "lora", {"init": "olora"}, ["attention.output.dense"]),
    ("bert", "lora", {"init": "milora"}, ["value"]),
    ("bert", "lora", {"init": "pissa_niter_4", "rslora": True}, ["value"]),
    ("bertcls", "lora", {}, ["query", "value"]),
    ("own", "lora", {}, ["q", "v"]),
    ("own", "dora", {"rslora": True}, ["q", "fc1"]),
    ("own", "adalora", {"target_r": 2}, ["q", "v"]),
    ("own", "lora", {"init": "pissa"}, ["q", "v"]),
]


def _label(kind, variant, fields):
    extra = ",".join(f"{k}={v}" for k, v in fields.items() if k != "target_r")
    return f"{kind} {variant}{'(' + extra + ')' if extra else ''}"


def saved_by_peft_loaded_here(bases, kind, model, tmp_path, effect=EFFECT):
    """``(lowrank's outputs, PEFT's)``: ``model`` (a PEFT model) saved, then loaded back by PEFT
    and by lowrank onto fresh bases; asserts the adapter moves the output by over ``effect``."""
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(hf_model(bases, kind), tmp_path / "adapter").eval()
    back = lr.load_pretrained(lowrank_model(bases, kind), tmp_path / "adapter")
    mine, ref = outputs(kind, back, reloaded)
    assert rel(outputs(kind, lowrank_model(bases, kind))[0], ref) > effect   # the adapter matters
    return mine, ref


@pytest.mark.parametrize("kind,variant,fields,targets", TO_PEFT,
                         ids=[_label(*c[:3]) for c in TO_PEFT])
def test_lowrank_to_peft_and_back(bases, tmp_path, kind, variant, fields, targets):
    model = lowrank_model(bases, kind)
    lr.adapters.inject(model, lr.adapters.config(variant, r=4, alpha=8, **fields), targets)
    randomize_adapters(model, seed=1, scale=0.3)
    if variant == "adalora":
        pruned(model)
    base = bases / "own" if kind == "own" else None
    lr.save_pretrained(model, tmp_path / "adapter", base=base)
    loaded = peft.PeftModel.from_pretrained(hf_model(bases, kind), tmp_path / "adapter").eval()
    mine, ref = outputs(kind, model, loaded)
    with lr.adapters.disable_adapter(model):
        assert rel(outputs(kind, model)[0], ref) > EFFECT   # the adapter matters
    label = _label(kind, variant, fields)
    note(f"{label}: lowrank -> PEFT", rel(mine, ref))
    back = lr.load_pretrained(lowrank_model(bases, kind), tmp_path / "adapter")
    note(f"{label}: lowrank -> PEFT dir -> lowrank", rel(outputs(kind, back)[0], ref))


# --- PEFT -> lowrank -----------------------------------------------------------------------------

FROM_PEFT = [   # (base, PEFT config)
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_rslora=True)),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True)),
    ("gpt2", dict(adalora=True, init_r=4, target_r=2, lora_alpha=8,
                  target_modules=["c_attn", "c_fc"], total_step=100)),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "dense"], use_rslora=True)),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["value", "dense"], use_dora=True)),
    ("bert", dict(adalora=True, init_r=4, target_r=2, lora_alpha=8,
                  target_modules=["value", "dense"], total_step=100)),
    ("bertcls", dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("own", dict(r=4, lora_alpha=8, target_modules=["q", "v", "fc2"])),
    ("own", dict(r=4, lora_alpha=8, target_modules=["k", "o"], use_dora=True, use_rslora=True)),
    ("own", dict(adalora=True, init_r=4, target_r=2, lora_alpha=8, target_modules=["q", "fc1"],
                 total_step=100)),
]


def _peft_label(kind, cfg):
    name = "adalora" if cfg.get("adalora") else "dora" if cfg.get("use_dora") else \
        "rslora" if cfg.get("use_rslora") else "lora"
    return f"{kind} {name} {'+'.join(cfg['target_modules'])}"


@pytest.mark.parametrize("kind,cfg", FROM_PEFT, ids=[_peft_label(*c) for c in FROM_PEFT])
def test_peft_to_lowrank(bases, tmp_path, kind, cfg):
    label = _peft_label(kind, cfg)
    cfg = dict(cfg)
    config = peft.AdaLoraConfig(**{k: v for k, v in cfg.items() if k != "adalora"}) \
        if cfg.pop("adalora", False) else peft.LoraConfig(**cfg)
    model = peft.get_peft_model(hf_model(bases, kind), config)
    perturb_peft(model, seed=2, prune=isinstance(config, peft.AdaLoraConfig), scale=0.3)
    mine, ref = saved_by_peft_loaded_here(bases, kind, model, tmp_path)
    note(f"{label}: PEFT -> lowrank", rel(mine, ref))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_converted_pissa_to_lowrank(bases, tmp_path, init):
    """PEFT's own PiSSA/OLoRA conversion (``path_initial_model_for_weight_conversion``) is a
    rank-2r LoRA over the original weights, which lowrank loads as LoRA."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                             init_lora_weights=init)
    model = peft.get_peft_model(hf_model(bases, "bert"), config)
    model.peft_config["default"].init_lora_weights = True   # PEFT's documented recipe
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = init
    perturb_peft(model, seed=3, scale=0.3)
    model.save_pretrained(tmp_path / "converted",
                          path_initial_model_for_weight_conversion=tmp_path / "init")
    mine, ref = outputs("bert", lr.load_pretrained(lowrank_model(bases, "bert"),
                                                            tmp_path / "converted"),
                        model.eval())
    assert rel(outputs("bert", lowrank_model(bases, "bert"))[0], ref) > EFFECT
    note(f"bert {init} (PEFT-converted): PEFT -> lowrank", rel(mine, ref))


# --- the real MiniLM -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    """(lowrank MiniLM, transformers MiniLM): copies are taken per test (loading is slow)."""
    try:
        path = lr.files.locate.resolve("minilm")
    except ValueError as exc:
        pytest.skip(f"the MiniLM weights are not installed: {exc}")
    return lr.from_pretrained("minilm"), transformers.BertModel.from_pretrained(path).eval()


def test_minilm_lora_both_ways(minilm, tmp_path):
    model = copy.deepcopy(minilm[0])
    lr.adapters.inject(model, lr.adapters.config("lora", r=8, alpha=16), ["query", "value"])
    randomize_adapters(model, seed=4, scale=0.1)
    lr.save_pretrained(model, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(minilm[1]), tmp_path / "a").eval()
    mine, ref = outputs("bert", model, loaded)
    assert rel(outputs("bert", minilm[0])[0], ref) > EFFECT
    note("MiniLM lora: lowrank -> PEFT", rel(mine, ref))
    back = lr.load_pretrained(copy.deepcopy(minilm[0]), tmp_path / "a")
    note("MiniLM lora: lowrank -> PEFT dir -> lowrank", rel(outputs("bert", back)[0], ref))


def test_minilm_peft_adalora_to_lowrank(minilm, tmp_path):
    config = peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, total_step=100,
                                target_modules=["query", "value"])
    model = peft.get_peft_model(copy.deepcopy(minilm[1]), config)
    perturb_peft(model, seed=5, prune=True, scale=0.1)
    model.save_pretrained(tmp_path / "a")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(minilm[1]), tmp_path / "a").eval()
    mine, ref = outputs("bert", lr.load_pretrained(copy.deepcopy(minilm[0]),
                                                            tmp_path / "a"), reloaded)
    assert rel(outputs("bert", minilm[0])[0], ref) > EFFECT
    note("MiniLM adalora (pruned): PEFT -> lowrank", rel(mine, ref))


# --- variants PEFT lacks -------------------------------------------------------------------------

def test_variant_peft_lacks_saves_in_lowrank_format(bases, tmp_path):
    model = lr.from_pretrained(bases / "bert")
    lr.adapters.inject(model, lr.adapters.config("sora", r=4), ["value"])
    randomize_adapters(model, seed=6, scale=0.3)
    lr.adapters.save_pretrained(model, tmp_path / "a")
    info = lr.files.storage.read_json(tmp_path / "a" / "adapter_config.json")
    assert "peft_type" not in info and "PEFT has no sora" in (tmp_path / "a" / "README.md").read_text()
    with pytest.raises(Exception, match="peft_type"):   # PEFT refuses it
        peft.PeftModel.from_pretrained(hf_model(bases, "bert"), tmp_path / "a")
    back = lr.load_pretrained(lr.from_pretrained(bases / "bert"), tmp_path / "a")
    assert rel(outputs("bert", back)[0], outputs("bert", model)[0]) == 0.0
    with lr.adapters.disable_adapter(back):
        assert rel(outputs("bert", back)[0], outputs("bert", model)[0]) > EFFECT
