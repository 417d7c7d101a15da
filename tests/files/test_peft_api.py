"""PEFT's model-level API in lowrank (docs/peft.md#api) and directories load_pretrained
refuses (docs/peft.md#errors): merge_and_unload then lr.save / lr.load, disable_adapter, named
adapters, the trainable summary, repr, PEFT's config names; a LoHa directory, a wrong base, a
truncated or incomplete file: one-line ValueErrors, the model left as it was.
"""
import io
import contextlib

import numpy as np
import pytest

import lowrank as lr
from lowrank.adapters import adapted_modules
from lowrank.nn.layers import Linear
from tests.helpers.peft import bert_out, gpt_out, host, randomize_adapters

TINY = dict(vocab_size=50, context=16, n_layer=2, n_head=2, d_model=16)
IDS = np.random.default_rng(0).integers(0, 50, size=(2, 7))


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def adapted_gpt(variant="lora", targets=("q", "v"), seed=1, **fields):
    model = lr.GPT(lr.GPTConfig(**TINY))
    lr.adapters.inject(model, lr.adapters.config(variant, r=4, alpha=8, **fields), list(targets))
    randomize_adapters(model, seed=seed)
    return model


def state(model) -> dict:
    """Every parameter (host copy) and which module class holds each name."""
    return {n: host(p.data).copy() for n, p in model.named_parameters()}, \
        {n: type(m).__name__ for n, m in model.named_modules()}


# --- merge_and_unload ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["lora", "dora", "adalora"])
def test_merge_and_unload_then_save_and_load(tmp_path, variant):
    model = adapted_gpt(variant, targets=("q", "v", "fc1"))
    adapted = gpt_out(model, IDS)
    with lr.adapters.disable_adapter(model):
        assert rel(gpt_out(model, IDS), adapted) > 1e-2     # the adapter matters
    lr.adapters.merge_and_unload(model)
    assert not adapted_modules(model)
    assert all(isinstance(m, Linear) for n, m in model.named_modules() if n.endswith(".q"))
    merged = gpt_out(model, IDS)
    lr.save(model, tmp_path / "merged")
    loaded = gpt_out(lr.load(tmp_path / "merged"), IDS)
    err_saved, err_merge = rel(loaded, merged), rel(merged, adapted)
    print(f"\nmerge_and_unload {variant}: saved/loaded vs merged {err_saved:.2e}, merged vs "
          f"adapted {err_merge:.2e}")
    assert err_saved < 1e-6 and err_merge < 1e-6


# --- disable_adapter, named adapters, summary, repr ----------------------------------------------

def test_disable_adapter_runs_the_base_and_restores():
    base = lr.GPT(lr.GPTConfig(**TINY))
    plain = gpt_out(base, IDS)
    lr.adapters.inject(base, lr.adapters.config("lora", r=4), ["q", "v"])
    randomize_adapters(base, seed=2)
    adapted = gpt_out(base, IDS)
    assert rel(adapted, plain) > 1e-3
    with lr.adapters.disable_adapter(base):
        assert rel(gpt_out(base, IDS), plain) < 1e-6
        assert not adapted_modules(base)
    assert rel(gpt_out(base, IDS), adapted) == 0.0 and len(adapted_modules(base)) == 4


def test_named_adapters_switch():
    model = lr.GPT(lr.GPTConfig(**TINY))
    plain = gpt_out(model, IDS)
    lr.adapters.inject(model, lr.adapters.config("lora", r=4), ["q", "v"])
    randomize_adapters(model, seed=3)
    first = gpt_out(model, IDS)
    lr.adapters.add_adapter(model, "mlp", lr.adapters.config("dora", r=2), ["fc1"])
    randomize_adapters(model, seed=4)
    second = gpt_out(model, IDS)
    assert lr.adapters.adapter_names(model) == ["default", "mlp"]
    assert {n.rpartition(".")[2] for n, _ in adapted_modules(model)} == {"fc1"}
    assert min(rel(second, first), rel(second, plain), rel(first, plain)) > 1e-3
    lr.adapters.set_adapter(model, "default")
    assert rel(gpt_out(model, IDS), first) == 0.0
    lr.adapters.set_adapter(model, "mlp")
    assert rel(gpt_out(model, IDS), second) == 0.0
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lr.adapters.set_adapter(model, "x")


def test_trainable_summary_matches_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from reference.peft_files import twin_of
    from tests.helpers.peft import own_weights
    model = lr.GPT(lr.GPTConfig(**TINY))
    twin = twin_of(model.config.to_dict(), own_weights(model))
    lr.adapters.inject(model, lr.adapters.config("lora", r=4), ["q", "v"])
    twin = peft.get_peft_model(twin, peft.LoraConfig(r=4, target_modules=["q", "v"]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        twin.print_trainable_parameters()
    assert lr.adapters.trainable_summary(model) == printed.getvalue().strip()
    assert torch is not None


def test_repr_shows_the_module_tree():
    text = repr(adapted_gpt())
    assert text.startswith("GPT(") and "(blocks.0): GPTBlock(" in text
    assert "(q): LoraLinear(16x16, LoraConfig(r=4, alpha=8.0" in text
    assert "(k): Linear(weight: (16, 16) frozen, bias: (16,) frozen)" in text


def test_peft_config_names():
    cfg = lr.adapters.config("lora", r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True)
    assert (cfg.alpha, cfg.dropout, cfg.rslora, cfg.scaling()) == (16.0, 0.1, True, 8.0)
    assert lr.adapters.config("lora", use_dora=True).variant == "dora"
    cfg, targets = lr.adapters.config_from_peft(
        {"peft_type": "ADALORA", "init_r": 6, "target_r": 3, "lora_alpha": 8,
         "target_modules": ["query", "value"], "total_step": 10, "r": 8})
    assert (cfg.variant, cfg.r, cfg.target_r, cfg.alpha, targets) == \
        ("adalora", 6, 3, 8.0, ["query", "value"])
    with pytest.raises(ValueError, match="LOHA"):
        lr.adapters.config_from_peft({"peft_type": "LOHA"})


# --- directories load_pretrained refuses -------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A PEFT-format LoRA directory for the tiny GPT (seed 0), and its base directory."""
    base = lr.GPT(lr.GPTConfig(**TINY))
    lr.save(base, tmp_path / "base")
    model = lr.from_pretrained(tmp_path / "base")
    lr.adapters.inject(model, lr.adapters.config("lora", r=4), ["q", "v", "fc2"])
    randomize_adapters(model, seed=5)
    lr.save_pretrained(model, tmp_path / "adapter")
    return tmp_path, gpt_out(model, IDS)


def refused(model, directory, match):
    before = state(model)
    with pytest.raises(ValueError, match=match) as info:
        lr.load_pretrained(model, directory)
    message = str(info.value)
    after = state(model)
    assert "\n" not in message
    assert before[1] == after[1] and not adapted_modules(model)
    assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0])
    return message


def test_round_trip_of_the_fixture(saved):
    root, out = saved
    model = lr.load_pretrained(lr.load(root / "base"), root / "adapter")
    assert rel(gpt_out(model, IDS), out) == 0.0


def test_peft_variant_lowrank_lacks(saved, tmp_path):
    root, _ = saved
    info = lr.files.storage.read_json(root / "adapter" / "adapter_config.json")
    (tmp_path / "ia3").mkdir()
    lr.files.storage.write_json(tmp_path / "ia3" / "adapter_config.json",
                          {**info, "peft_type": "IA3"})
    message = refused(lr.load(root / "base"), tmp_path / "ia3", "PEFT IA3 adapter")
    assert "lowrank reads LORA" in message


def test_wrong_base(saved):
    root, _ = saved
    other = lr.GPT(lr.GPTConfig(**{**TINY, "d_model": 8}))
    refused(other, root / "adapter", "shape mismatch|rank")
    bert = lr.models.Bert(lr.models.BertConfig(vocab_size=50, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32))
    assert bert_out is not None
    refused(bert, root / "adapter", "is not a Linear of this Bert .*another base")


def test_truncated_file(saved):
    root, _ = saved
    path = root / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(lr.load(root / "base"), root / "adapter", "adapter_model.safetensors")


def test_missing_tensor_in_the_last_module(saved):
    """The first modules would load; the last lacks lora_B: nothing is loaded at all."""
    root, _ = saved
    path = root / "adapter" / "adapter_model.safetensors"
    tensors = lr.files.storage.read_safetensors(path)
    last = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]
    del tensors[last]
    lr.files.storage.write_safetensors(path, tensors)
    refused(lr.load(root / "base"), root / "adapter", "has no 'lora_B.weight' tensor")


def test_not_an_adapter_directory(saved, tmp_path):
    root, _ = saved
    refused(lr.load(root / "base"), tmp_path, "has no adapter_config.json")
    lr.files.storage.write_json(tmp_path / "adapter_config.json", {"r": 4})
    refused(lr.load(root / "base"), tmp_path, "no 'peft_type'")


def test_lowrank_format_truncated(tmp_path):
    base = lr.GPT(lr.GPTConfig(**TINY))
    lr.save(base, tmp_path / "base")
    model = lr.from_pretrained(tmp_path / "base")
    lr.adapters.inject(model, lr.adapters.config("sora", r=4), ["q"])
    lr.save_pretrained(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    refused(lr.load(tmp_path / "base"), tmp_path / "a", "adapter_model.safetensors")


# --- the CLI's --adapter takes PEFT's directories --------------------------------------------

def test_cli_adapter_reads_a_peft_directory(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from lowrank.app import workflows as wf
    from lowrank.app.cli import main
    from reference.peft_files import perturb_peft, twin_of
    from tests.helpers.common import pretrain_tiny_base
    from tests.helpers.peft import own_weights
    pretrain_tiny_base(tmp_path)
    base = lr.load(tmp_path / "base")
    twin = twin_of(base.config.to_dict(), own_weights(base), dtype=torch.float64)
    twin = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    perturb_peft(twin, seed=6)
    twin.save_pretrained(tmp_path / "peft")
    model, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "peft")
    ids = IDS % base.config.vocab_size
    with torch.no_grad():
        ref = twin(torch.as_tensor(ids)).numpy()
    assert rel(gpt_out(model, ids), ref) < 1e-9                 # float64 base and adapter
    assert main(["generate", "--model", str(tmp_path / "base"), "--adapter",
                 str(tmp_path / "peft"), "--prompt", "def ", "--max-new-tokens", "5"]) in (0, None)
    assert capsys.readouterr().out.startswith("def ")


def test_load_pretrained_under_a_name(saved):
    root, out = saved
    model = lr.load(root / "base")
    lr.adapters.inject(model, lr.adapters.config("lora", r=2), ["k"])
    randomize_adapters(model, seed=7)
    first = gpt_out(model, IDS)
    with pytest.raises(ValueError, match="already holds adapters"):
        lr.load_pretrained(model, root / "adapter")
    with pytest.raises(ValueError, match="no adapter_config.json"):   # the active one stays
        lr.load_pretrained(model, root / "missing", adapter_name="peft")
    assert rel(gpt_out(model, IDS), first) == 0.0
    lr.load_pretrained(model, root / "adapter", adapter_name="peft")
    assert rel(gpt_out(model, IDS), out) == 0.0
    lr.adapters.set_adapter(model, "default")
    assert rel(gpt_out(model, IDS), first) == 0.0


def test_peft_format_needs_bias_none(tmp_path):
    model = lr.GPT(lr.GPTConfig(**TINY))
    lr.adapters.inject(model, lr.adapters.config("lora", r=2, bias="all"), ["q"])
    with pytest.raises(ValueError, match="bias='all'"):
        lr.save_pretrained(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_loaded_adapter_trains(saved):
    """Loaded layers are ordinary adapters: gradients reach them, and only them."""
    root, _ = saved
    model = lr.load_pretrained(lr.load(root / "base"), root / "adapter")
    model.zero_grad()
    loss, cache = model.loss(IDS, np.roll(IDS, -1, axis=1))
    model.loss_backward(cache)
    grads = {n: p.grad for n, p in model.named_parameters()}
    trained = sorted(n for n, g in grads.items() if g is not None)
    assert trained and all(".lora_" in n for n in trained)
    assert all(float(np.abs(host(grads[n])).max()) > 0 for n in trained if "lora_A" in n)
