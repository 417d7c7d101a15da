"""VeRA, LoHa and LoKr adapter directories both ways with real PEFT (docs/peft.md#vera-loha-lokr):
lowrank -> PEFT (``save_pretrained`` then ``PeftModel.from_pretrained``) and PEFT -> lowrank
(``get_peft_model`` ... ``save_pretrained`` then ``load_pretrained``) on tiny random BERT
checkpoints (and VeRA on GPT-2's unfused Linears); VeRA with and without its saved
projections. Every output within 1e-5 relative in float32. Run with ``-s`` for the figures.
GPT-2 refusals: a q/k/v adapter of any of the three (fused c_attn), LoHa/LoKr at all (PEFT's
LoHa/LoKr do not wrap Conv1D).
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowrank as lr  # noqa: E402
from reference.peft_files import rel  # noqa: E402
from tests.helpers.peft import host  # noqa: E402
# the figures print with test_peft_files' (its ``_report``, ``note``: float32, limit 1e-5)
from tests.files.test_peft_dirs import (_report, bases, hf_model, lowrank_model,  # noqa: E402,F401
                                   note, outputs, saved_by_peft_loaded_here)

EFFECT = 1e-3   # the adapter moves the output by more than this (relative): the check can fail
PEFT_CONFIGS = {"vera": peft.VeraConfig, "loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}
ADAPTER_PREFIXES = ("vera_lambda", "hada_", "lokr_")


def perturb_lowrank(model, seed, scale=0.3):
    """Every adapter parameter random (VeRA's λ's, LoHa's and LoKr's factors)."""
    rng = np.random.default_rng(seed)
    for _, layer in lr.adapters.adapted_modules(model):
        for name, p in layer.named_parameters():
            if name.startswith(ADAPTER_PREFIXES):   # not the frozen base weight and bias
                p.data = (scale * rng.standard_normal(p.shape)).astype(p.dtype)


def perturb_peft(model, seed, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ADAPTER_PREFIXES):
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                touched += 1
    assert touched


def _label(kind, variant, fields, targets):
    extra = ",".join(f"{k}={v}" for k, v in fields.items())
    return f"{kind} {variant}({extra}) {'+'.join(targets)}"


TO_PEFT = [   # (base, variant, lowrank config fields, targets)
    ("bert", "vera", {"r": 4}, ["query", "value", "intermediate.dense"]),
    ("bert", "vera", {"r": 4, "save_projection": False, "projection_prng_key": 3,
                      "d_initial": 0.2}, ["query", "intermediate.dense", "output.dense"]),
    ("bert", "loha", {"r": 4, "alpha": 8}, ["query", "value"]),
    ("bert", "loha", {"r": 2, "alpha": 3}, ["key", "intermediate.dense"]),
    ("bert", "lokr", {"r": 2, "alpha": 4}, ["query", "intermediate.dense"]),
    ("bert", "lokr", {"r": 1, "alpha": 2, "decompose_both": True}, ["intermediate.dense"]),
    ("bert", "lokr", {"r": 2, "alpha": 2, "decompose_factor": 2}, ["value", "output.dense"]),
    ("bertcls", "loha", {"r": 2, "alpha": 4}, ["query", "value"]),
    ("gpt2", "vera", {"r": 4}, ["o", "fc1", "fc2"]),
]


@pytest.mark.parametrize("kind,variant,fields,targets", TO_PEFT,
                         ids=[_label(*c) for c in TO_PEFT])
def test_lowrank_to_peft_and_back(bases, tmp_path, kind, variant, fields, targets):  # noqa: F811
    model = lowrank_model(bases, kind)
    lr.adapters.inject(model, lr.adapters.config(variant, **fields), targets)
    perturb_lowrank(model, seed=1)
    lr.save_pretrained(model, tmp_path / "adapter")
    info = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert info["peft_type"] == variant.upper()
    loaded = peft.PeftModel.from_pretrained(hf_model(bases, kind), tmp_path / "adapter").eval()
    mine, ref = outputs(kind, model, loaded)
    with lr.adapters.disable_adapter(model):
        assert rel(outputs(kind, model)[0], ref) > EFFECT   # the adapter matters
    label = _label(kind, variant, fields, targets)
    note(f"{label}: lowrank -> PEFT", rel(mine, ref))
    back = lr.load_pretrained(lowrank_model(bases, kind), tmp_path / "adapter")
    assert [type(m).__name__ for _, m in lr.adapters.adapted_modules(back)] == \
        [type(m).__name__ for _, m in lr.adapters.adapted_modules(model)]
    note(f"{label}: lowrank -> PEFT dir -> lowrank", rel(outputs(kind, back)[0], ref))


FROM_PEFT = [   # (base, variant, PEFT config fields)
    ("bert", "vera", dict(r=4, target_modules=["query", "value", "intermediate.dense"])),
    ("bert", "vera", dict(r=4, target_modules=["query", "dense"], save_projection=False,
                          projection_prng_key=7)),
    ("bert", "loha", dict(r=4, alpha=8, target_modules=["query", "value"])),
    ("bert", "loha", dict(r=2, alpha=4, target_modules=["key", "dense"],
                          rank_pattern={"key": 4}, alpha_pattern={"key": 2})),
    ("bert", "lokr", dict(r=2, alpha=4, target_modules=["query", "intermediate.dense"])),
    ("bert", "lokr", dict(r=1, alpha=2, decompose_both=True, target_modules=["dense"])),
    ("bert", "lokr", dict(r=2, alpha=2, decompose_factor=2, target_modules=["value"])),
    ("bertcls", "lokr", dict(r=2, alpha=4, target_modules=["query", "value", "dense"],
                             task_type="SEQ_CLS")),
    ("gpt2", "vera", dict(r=4, target_modules=["c_proj", "c_fc"], fan_in_fan_out=True)),
]


def _peft_label(kind, variant, cfg):
    extra = ",".join(f"{k}={v}" for k, v in cfg.items() if k not in ("target_modules",
                                                                    "task_type"))
    return f"{kind} {variant}({extra}) {'+'.join(cfg['target_modules'])}"


@pytest.mark.parametrize("kind,variant,cfg", FROM_PEFT, ids=[_peft_label(*c) for c in FROM_PEFT])
def test_peft_to_lowrank(bases, tmp_path, kind, variant, cfg):  # noqa: F811
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(bases, kind), PEFT_CONFIGS[variant](**cfg))
    perturb_peft(model, seed=2)
    mine, ref = saved_by_peft_loaded_here(bases, kind, model, tmp_path, EFFECT)
    note(f"{_peft_label(kind, variant, cfg)}: PEFT -> lowrank", rel(mine, ref))


@pytest.mark.parametrize("variant,targets,match", [
    ("vera", ["q", "v"], "fused c_attn"),    # q, k, v use B's first m rows; c_attn would use 3m
    ("loha", ["o"], "does not wrap GPT-2's Conv1D"),   # PEFT: TypeError on Conv1D
    ("lokr", ["fc1"], "does not wrap GPT-2's Conv1D")])
def test_gpt2_refusals(bases, tmp_path, variant, targets, match):  # noqa: F811
    model = lowrank_model(bases, "gpt2")
    lr.adapters.inject(model, lr.adapters.config(variant, r=2), targets)
    with pytest.raises(ValueError, match=match):
        lr.save_pretrained(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_vera_projections_saved_are_the_layers(bases, tmp_path):  # noqa: F811
    """save_projection=True writes the shared pair once, whole; the λ's per module."""
    model = lowrank_model(bases, "bert")
    lr.adapters.inject(model, lr.adapters.config("vera", r=4), ["query", "intermediate.dense"])
    lr.save_pretrained(model, tmp_path / "adapter")
    saved = lr.files.storage.read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    layer = dict(lr.adapters.adapted_modules(model))["encoder.layer.0.intermediate.dense"]
    A, B = (host(a) for a in layer.shared_projections())
    assert np.array_equal(saved["base_model.vera_A"], A) and A.shape == (4, 16)
    assert np.array_equal(saved["base_model.vera_B"], B) and B.shape == (32, 4)
    assert sum(k.endswith("vera_lambda_b") for k in saved) == 2 * 2   # 2 layers x 2 modules


def test_lokr_factor_mismatch_is_refused_whole(bases, tmp_path):  # noqa: F811
    """A LoKr file whose factors disagree with its config (w2 whole where r says factored)
    is refused and the model is left as it was."""
    torch.manual_seed(0)
    config = peft.LoKrConfig(r=2, alpha=4, target_modules=["intermediate.dense"])
    model = peft.get_peft_model(hf_model(bases, "bert"), config)
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "r": 8}))   # r=8 makes w2 (8, 4) whole
    ours = lowrank_model(bases, "bert")
    with pytest.raises(ValueError, match="lokr_w2"):
        lr.load_pretrained(ours, tmp_path / "adapter")
    assert not lr.adapters.adapted_modules(ours)


def test_peft_vera_on_c_attn_is_refused(bases, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    config = peft.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(hf_model(bases, "gpt2"), config)
    model.save_pretrained(tmp_path / "adapter")
    ours = lowrank_model(bases, "gpt2")
    with pytest.raises(ValueError, match="fused c_attn"):
        lr.load_pretrained(ours, tmp_path / "adapter")
    assert not lr.adapters.adapted_modules(ours)


def test_vera_file_with_half_the_projections_is_refused(bases, tmp_path):  # noqa: F811
    model = lowrank_model(bases, "bert")
    lr.adapters.inject(model, lr.adapters.config("vera", r=4), ["query"])
    lr.save_pretrained(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    saved = lr.files.storage.read_safetensors(path)
    del saved["base_model.vera_B"]
    path.write_bytes(lr.files.storage.safetensors_bytes(saved, {}))
    ours = lowrank_model(bases, "bert")
    with pytest.raises(ValueError, match="vera_A / vera_B only"):
        lr.load_pretrained(ours, tmp_path / "adapter")
    assert not lr.adapters.adapted_modules(ours)
