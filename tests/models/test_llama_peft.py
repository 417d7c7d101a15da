"""PEFT adapter directories both ways on a tiny Llama (and Qwen2) checkpoint (docs/llama.md#peft):
lowrank -> PEFT (``save_pretrained``, then ``PeftModel.from_pretrained`` over transformers'
``LlamaForCausalLM``) and PEFT -> lowrank (``get_peft_model`` ... ``save_pretrained``, then
``lr.adapters.load_pretrained``), for LoRA, rsLoRA, DoRA, AdaLoRA, VeRA, LoHa and LoKr by
PEFT's target names. Every logit within 1e-5 relative (max |a - b| / max |b|) in float32.
Run with ``-s`` for the figures.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import lowrank as lr  # noqa: E402
from reference.peft_files import rel  # noqa: E402
from tests.helpers.common import error_log, to_host  # noqa: E402
from tests.models.llama_oracle import load, tiny_checkpoint  # noqa: E402

ERRORS, _report_errors = error_log("Llama PEFT files, float32 logits (max |a-b| / max |b|)")
TOL, EFFECT = 1e-5, 1e-3
IDS = np.array([[3, 17, 5, 40, 2, 9], [11, 0, 47, 6, 6, 30]])
ADAPTER_KEYS = ("lora_", "vera_lambda", "hada_", "lokr_")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_peft")
    return {"llama": tiny_checkpoint(root / "llama", "llama", seed=1),
            "qwen2": tiny_checkpoint(root / "qwen2", "qwen2", seed=2, tie_word_embeddings=True)}


def ours(bases, kind):
    return lr.from_pretrained(bases[kind], dtype="float32")


def theirs(bases, kind):
    return load(bases[kind], kind, "float32")


def logits(model):
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(torch.tensor(IDS)).logits.numpy()
    return to_host(model.forward(model.xp.asarray(IDS))[0])


def randomize_lowrank(model, seed, scale=0.3):
    """Every trainable adapter tensor random; DoRA magnitudes scaled by 1 + noise; AdaLoRA
    with every other triplet masked (a pattern its allocator could leave)."""
    rng = np.random.default_rng(seed)
    for _, layer in lr.adapters.adapted_modules(model):
        for name, p in layer.named_parameters(trainable_only=True):
            noise = rng.standard_normal(p.shape)
            p.data = (to_host(p.data) * (1 + scale * noise) if "magnitude" in name
                      else scale * noise).astype(p.dtype)
        if hasattr(layer, "rank_pattern"):
            drop = list(range(1, layer.r, 2))
            layer.lora_E.data[drop] = 0.0
            layer.rank_pattern = [i not in drop for i in range(layer.r)]


def randomize_peft(model, seed, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    pattern = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
            elif any(k in name for k in ADAPTER_KEYS):
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            if "lora_E" in name:
                keep = [i % 2 == 0 for i in range(p.shape[0])]
                p[[not k for k in keep]] = 0.0
                pattern[name.removeprefix("base_model.model.")] = keep
    if pattern:
        model.peft_config["default"].rank_pattern = pattern


TO_PEFT = [   # (base, variant, lowrank config fields, targets)
    ("llama", "lora", dict(r=4, alpha=8), ["q_proj", "v_proj"]),
    ("llama", "lora", dict(r=4, alpha=8, rslora=True), ["k_proj", "o_proj", "down_proj"]),
    ("llama", "dora", dict(r=4, alpha=8), ["q_proj", "gate_proj", "up_proj"]),
    ("llama", "adalora", dict(r=4, alpha=8, target_r=2), ["q_proj", "v_proj"]),
    ("llama", "vera", dict(r=4), ["q_proj", "v_proj", "down_proj"]),
    ("llama", "loha", dict(r=4, alpha=8), ["q_proj", "up_proj"]),
    ("llama", "lokr", dict(r=2, alpha=4), ["v_proj", "gate_proj"]),
    ("qwen2", "lora", dict(r=4, alpha=8), ["q_proj", "k_proj", "v_proj"]),
    ("qwen2", "dora", dict(r=2, alpha=4), ["v_proj", "down_proj"]),
]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _label(kind, variant, fields, targets):
    extra = ",".join(f"{k}={v}" for k, v in fields.items())
    return f"{kind} {variant}({extra}) {'+'.join(targets)}"


@pytest.mark.parametrize("kind,variant,fields,targets", TO_PEFT,
                         ids=[_label(*c) for c in TO_PEFT])
def test_lowrank_to_peft_and_back(bases, tmp_path, kind, variant, fields, targets):
    model = ours(bases, kind)
    lr.adapters.inject(model, lr.adapters.config(variant, **fields), targets)
    randomize_lowrank(model, seed=1)
    lr.adapters.save_pretrained(model, tmp_path / "adapter")
    info = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert info["peft_type"] == {"dora": "LORA"}.get(variant, variant.upper())
    assert info["task_type"] == "CAUSAL_LM"
    loaded = peft.PeftModel.from_pretrained(theirs(bases, kind), tmp_path / "adapter").eval()
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    mine, ref = logits(model), logits(loaded)
    with lr.adapters.disable_adapter(model):
        assert rel(logits(model), ref) > EFFECT               # the adapter matters
    label = _label(kind, variant, fields, targets)
    ERRORS.check(f"{label}: lowrank -> PEFT", rel(mine, ref), TOL)
    back = lr.adapters.load_pretrained(ours(bases, kind), tmp_path / "adapter")
    ERRORS.check(f"{label}: lowrank -> PEFT dir -> lowrank", rel(logits(back), ref), TOL)


FROM_PEFT = [   # (base, PEFT config class, fields)
    ("llama", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("llama", "LoraConfig", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                 use_rslora=True)),
    ("llama", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["k_proj", "down_proj"],
                                 use_dora=True)),
    ("llama", "AdaLoraConfig", dict(init_r=4, target_r=2, lora_alpha=8, total_step=100,
                                    target_modules=["q_proj", "up_proj"])),
    ("llama", "VeraConfig", dict(r=4, target_modules=["q_proj", "v_proj", "gate_proj"])),
    ("llama", "LoHaConfig", dict(r=4, alpha=8, target_modules=["o_proj", "down_proj"])),
    ("llama", "LoKrConfig", dict(r=2, alpha=4, target_modules=["q_proj", "up_proj"])),
    ("qwen2", "LoraConfig", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("qwen2", "LoKrConfig", dict(r=1, alpha=2, decompose_both=True,
                                 target_modules=["k_proj", "v_proj"])),
]


def _peft_label(kind, cls, cfg):
    extra = ",".join(f"{k}={v}" for k, v in cfg.items() if k != "target_modules")
    targets = cfg["target_modules"]
    return f"{kind} {cls}({extra}) {targets if isinstance(targets, str) else '+'.join(targets)}"


@pytest.mark.parametrize("kind,cls,cfg", FROM_PEFT, ids=[_peft_label(*c) for c in FROM_PEFT])
def test_peft_to_lowrank(bases, tmp_path, kind, cls, cfg):
    torch.manual_seed(0)
    model = peft.get_peft_model(theirs(bases, kind), getattr(peft, cls)(**cfg))
    randomize_peft(model, seed=2)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(theirs(bases, kind), tmp_path / "adapter").eval()
    back = lr.adapters.load_pretrained(ours(bases, kind), tmp_path / "adapter")
    mine, ref = logits(back), logits(reloaded)
    assert rel(logits(ours(bases, kind)), ref) > EFFECT        # the adapter matters
    if cfg["target_modules"] == "all-linear":                  # every Linear but the head
        assert sorted({n.split(".")[-1] for n, _ in lr.adapters.adapted_modules(back)}) == \
            sorted(ALL_LINEAR)
    ERRORS.check(f"{_peft_label(kind, cls, cfg)}: PEFT -> lowrank", rel(mine, ref), TOL)
