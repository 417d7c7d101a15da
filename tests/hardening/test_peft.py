"""PEFT-format adapter directories, hostile: configs edited field by field (every field of the
schema, wrong types and ranges, unknown fields, real PEFT fields lowrank does not implement)
and tensors replaced (NaN, Inf, 3e38, integer and boolean arrays). Each case ends refused with
one line naming the file and the field or key, or loaded with exactly the saved outputs (a
valid new alpha or rank: loaded as edited).

The generators are ``BAD_CONFIGS`` / ``NOOP_CONFIGS`` / ``TENSOR_CASES`` (fixed lists) and
``test_random_config_junk`` (junk values for random fields, ``$HARDENING_EXAMPLES`` of them).
"""
import json
import random

import numpy as np
import pytest

import lowrank as lr
from lowrank.adapters import adapted_modules
from tests.helpers.hardening import examples, record

TINY = dict(vocab_size=40, context=8, n_layer=1, n_head=2, d_model=16)
IDS = np.random.default_rng(0).integers(0, 40, size=(2, 8))
BAD_CONFIGS = [
    *[("r", v) for v in (-4, 0, 2.5, "2", True, 10**12, None)],
    *[("target_modules", v) for v in ("((", [1, 2], [], None, [""], 7)],
    *[("lora_alpha", v) for v in (-1, 0, "8", None, 1e300, True)],
    *[("lora_dropout", v) for v in (1.0, -0.1, "0")],
    ("rank_pattern", {"attn.q": 3}), ("rank_pattern", {"((": 4}), ("rank_pattern", {"q": -1}),
    ("rank_pattern", [4]), ("alpha_pattern", {"q": "a"}), ("alpha_pattern", {"[": 2}),
    ("surprise", 1), ("lowrank", {}), ("peft_type", "IA3"), ("peft_type", None),
    ("task_type", "FOO"), ("use_dora", "yes"), ("use_rslora", 1), ("fan_in_fan_out", 1),
    ("modules_to_save", "head"), ("modules_to_save", [3]), ("bias", "all"), ("bias", "x"),
    ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"), ("init_lora_weights", 1),
    ("inference_mode", "true"), ("base_model_name_or_path", 3),
    ("alora_invocation_tokens", [1, 2]), ("layer_replication", [[0, 1]]), ("use_qalora", True),
    ("lora_bias", True), ("trainable_token_indices", [1]), ("eva_config", {"rho": 2}),
    ("target_parameters", ["w"]), ("layers_to_transform", [0]), ("exclude_modules", ["q"]),
    ("loftq_config", {"loftq_bits": 4}), ("ensure_weight_tying", True), ("use_bdlora", {}),
]
NOOP_CONFIGS = [("alora_invocation_tokens", None), ("use_qalora", False), ("loftq_config", {}),
                ("layer_replication", None), ("megatron_core", "megatron.core"),
                ("qalora_group_size", 16), ("peft_version", "0.21.2"), ("task_type", None),
                ("init_lora_weights", False), ("init_lora_weights", "gaussian"),
                ("rank_pattern", {}), ("exclude_modules", None)]
JUNK = [None, True, False, 0, -1, 1, 2.5, 1e300, -1e300, 10**30, "", "x", "((", [], [1],
        ["q"], {}, {"a": 1}, [[1]], "LORA"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_hardening")
    lr.save(lr.GPT(lr.GPTConfig(**TINY)), root / "base")
    model = lr.load(root / "base")
    lr.adapters.inject(model, lr.adapters.config("lora", r=4, alpha=8), ["q", "v"])
    for name, p in model.named_parameters(trainable_only=True):
        p.data = np.random.default_rng(len(name)).standard_normal(p.shape).astype(p.dtype) * 0.1
    lr.save_pretrained(model, root / "adapter")
    return root, model.forward(IDS)[0]


# valid values here change the adapter's map legitimately: a load is "edited", not "wrong"
MATH = {"lora_alpha", "alpha_pattern", "use_rslora", "r", "rank_pattern"}


def outcome(battery, root, directory, expected, names, edits_math=False):
    """Load ``directory`` into a fresh base; classify what happened."""
    model = lr.load(root / "base")
    try:
        lr.load_pretrained(model, directory)
    except ValueError as exc:
        message = str(exc)
        if "\n" in message:
            return record(battery, "multiline", message)
        if not any(str(directory) in message and n in message for n in names):
            return record(battery, "unnamed", message)
        assert not adapted_modules(model)
        return record(battery, "refused", message)
    except Exception as exc:   # noqa: BLE001 — any other exception is the failure we count
        return record(battery, "traceback", f"{type(exc).__name__}: {exc}")
    out = model.forward(IDS)[0]
    if not np.isfinite(out).all():
        return record(battery, "nan", str(directory))
    if np.array_equal(out, expected):
        return record(battery, "identical", str(directory))
    return record(battery, "edited" if edits_math else "wrong", str(directory))


def edited(root, tmp_path, tag, field, value, drop=False):
    directory = tmp_path / tag
    directory.mkdir()
    info = json.loads((root / "adapter" / "adapter_config.json").read_text())
    if drop:
        info.pop(field)
    else:
        info[field] = value
    (directory / "adapter_config.json").write_text(json.dumps(info))
    (directory / "adapter_model.safetensors").write_bytes(
        (root / "adapter" / "adapter_model.safetensors").read_bytes())
    return directory


@pytest.mark.parametrize("field,value", BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v in BAD_CONFIGS])
def test_bad_config_field_refused_by_name(saved, tmp_path, field, value):
    root, expected = saved
    directory = edited(root, tmp_path, "a", field, value)
    names = [field, "PEFT"]
    assert outcome("peft-config", root, directory, expected, names) == "refused"


@pytest.mark.parametrize("field,value", NOOP_CONFIGS, ids=[f"{f}={v!r}" for f, v in NOOP_CONFIGS])
def test_noop_value_loads_identically(saved, tmp_path, field, value):
    root, expected = saved
    directory = edited(root, tmp_path, "a", field, value)
    assert outcome("peft-config", root, directory, expected, [field]) == "identical"


def test_missing_target_modules_refused(saved, tmp_path):
    root, expected = saved
    directory = edited(root, tmp_path, "a", "target_modules", None, drop=True)
    assert outcome("peft-config", root, directory, expected, ["target_modules"]) == "refused"


def test_random_config_junk(saved, tmp_path):
    """Junk values for random fields (known, unknown, PEFT's): refused or identical."""
    root, expected = saved
    info = json.loads((root / "adapter" / "adapter_config.json").read_text())
    fields = sorted(info) + ["use_qalora", "layer_replication", "nonsense", "alpha"]
    rng = random.Random(0)
    for i in range(examples(40)):
        field, value = rng.choice(fields), rng.choice(JUNK)
        directory = edited(root, tmp_path, f"r{i}", field, value)
        outcome("peft-config-random", root, directory, expected, [field, "PEFT", "rank"],
                edits_math=field in MATH)


TENSOR_CASES = ["nan", "inf", "-inf", "3e38", "1e10", "int32", "bool", "int64-zeros"]


def _poisoned(a, kind):
    a = np.array(a)
    if kind in ("nan", "inf", "-inf", "3e38", "1e10"):
        a.flat[a.size // 2] = float(kind)
        return a
    if kind == "int32":
        return np.round(a * 10).astype(np.int32)
    if kind == "bool":
        return a > 0
    return np.zeros(a.shape, np.int64)


@pytest.mark.parametrize("kind", TENSOR_CASES)
def test_poisoned_tensor_refused_naming_file_and_key(saved, tmp_path, kind):
    root, expected = saved
    tensors = lr.files.storage.read_safetensors(root / "adapter" / "adapter_model.safetensors")
    for i, key in enumerate(sorted(tensors)):
        directory = tmp_path / f"{kind}{i}"
        directory.mkdir()
        (directory / "adapter_config.json").write_bytes(
            (root / "adapter" / "adapter_config.json").read_bytes())
        bad = {**tensors, key: _poisoned(tensors[key], kind)}
        lr.files.storage.write_safetensors(directory / "adapter_model.safetensors", bad)
        assert outcome("peft-tensors", root, directory, expected, [key]) == "refused"


def test_lowrank_format_tensor_checked(tmp_path):
    """lowrank's own adapter files go through the same tensor check (before assignment)."""
    from lowrank.formats.adapter_dir import load_adapter, save_adapter
    from lowrank.files.storage import read_safetensors, safetensors_bytes, seal, sha256
    model = lr.GPT(lr.GPTConfig(**TINY))
    lr.adapters.inject(model, lr.adapters.config("lora", r=2), ["q"])
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = read_safetensors(path)
    key = sorted(tensors)[0]
    tensors[key] = _poisoned(tensors[key], "nan")
    data = safetensors_bytes(tensors)
    path.write_bytes(data)   # re-sealed as a forger would: the integrity record agrees
    info = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    info.pop("integrity", None)
    sealed = seal(info, {"adapter_model.safetensors": sha256(data)})
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(sealed))
    message = f"adapter_model.safetensors: tensor {key!r} holds NaN"
    with pytest.raises(ValueError, match=message) as info_:
        load_adapter(model, tmp_path / "a")
    assert "\n" not in str(info_.value)


OTHER_TYPES = {"adalora": (dict(r=4, target_r=2, total_step=10), ["q", "v"]),
               "vera": (dict(r=4), ["o", "fc1"]), "loha": (dict(r=2, alpha=4), ["o", "fc1"]),
               "lokr": (dict(r=2, alpha=4), ["o", "fc1"]),
               "dora": (dict(r=4, alpha=8), ["q", "v"])}
MATH_ALL = MATH | {"alpha", "init_r", "decompose_both", "decompose_factor", "use_dora"}


@pytest.mark.parametrize("variant", sorted(OTHER_TYPES))
def test_random_junk_other_types(tmp_path, variant):
    """Every PEFT type lowrank reads: junk in each of its schema's fields (and unknown ones)."""
    from lowrank.adapters import peft_codecs
    from lowrank.adapters._peft import COMMON_FIELDS
    fields, targets = OTHER_TYPES[variant]
    lr.save(lr.GPT(lr.GPTConfig(**TINY)), tmp_path / "base")
    model = lr.load(tmp_path / "base")
    lr.adapters.inject(model, lr.adapters.config(variant, **fields), targets)
    for name, p in model.named_parameters(trainable_only=True):
        p.data = (np.random.default_rng(len(name)).standard_normal(p.shape) * 0.1 + 0.1
                  ).astype(p.dtype)
    lr.save_pretrained(model, tmp_path / "adapter")
    expected = model.forward(IDS)[0]
    info = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    codec = next(c for c in peft_codecs() if c.peft_type == info["peft_type"])
    names = sorted({*COMMON_FIELDS, *codec.fields, "nonsense"} - {"peft_type"})
    rng = random.Random(variant)
    for i in range(examples(60)):
        field, value = rng.choice(names), rng.choice(JUNK)
        directory = edited(tmp_path, tmp_path, f"r{i}", field, value)
        outcome(f"peft-config-{variant}", tmp_path, directory, expected, [field, "PEFT", "rank"],
                edits_math=field in MATH_ALL)
