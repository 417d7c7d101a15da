"""Llama-family files without torch (docs/llama.md#files): Hugging Face directories (one file
or shards with an index), lowrank's own save and load, the config's checks and the fields
lowrank refuses by name."""
import json

import numpy as np
import pytest

import lowrank as lr
from lowrank.models import llama_hf
from lowrank.models.llama import Llama
from lowrank.models.llama_config import LlamaConfig
from tests.helpers.common import to_host

SIZES = dict(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
HF = {**SIZES, "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
      "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"},
      "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}


def write_hf(directory, hf_config, model, shards: int = 1):
    """A Hugging Face directory of ``model``'s numbers (the keys are the parameter names)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    tensors = {n: to_host(p.data).astype(np.float32) for n, p in model.named_parameters()}
    if shards == 1:
        lr.files.storage.write_safetensors(directory / "model.safetensors", tensors)
        return directory
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        lr.files.storage.write_safetensors(directory / file, part)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def source(seed=0, **fields):
    return Llama(LlamaConfig(**{**SIZES, "rms_norm_eps": 1e-5, "rope_theta": 500.0, **fields}),
                 seed=seed, dtype="float32")


IDS = np.array([[1, 5, 9, 2], [3, 3, 0, 29]])


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_directory_loads_every_parameter(tmp_path, shards):
    model = source(seed=4)
    loaded = lr.from_pretrained(write_hf(tmp_path / "hf", HF, model, shards), dtype="float32")
    assert isinstance(loaded, Llama) and loaded.config == model.config
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert np.array_equal(p.data, q.data), name
    assert np.array_equal(model.forward(IDS)[0], loaded.forward(IDS)[0])


def test_tied_head_and_old_buffers(tmp_path):
    model = source(tie_word_embeddings=True)
    assert "lm_head.weight" not in dict(model.named_parameters())
    directory = write_hf(tmp_path / "hf", {**HF, "tie_word_embeddings": True}, model)
    tensors = lr.files.storage.read_safetensors(directory / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]     # saved anyway
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    lr.files.storage.write_safetensors(directory / "model.safetensors", tensors)
    loaded = lr.from_pretrained(directory)
    assert np.array_equal(model.forward(IDS)[0], loaded.forward(IDS)[0])


def test_lowrank_save_and_load(tmp_path):
    model = source(seed=2, rope_type="llama3", attention_bias=True, rope_factor=8.0,
                   low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
    lr.save(model, tmp_path / "ckpt")
    back = lr.load(tmp_path / "ckpt")
    assert back.config == model.config
    assert np.array_equal(model.forward(IDS)[0], back.forward(IDS)[0])


def test_old_style_rope_fields(tmp_path):
    """``rope_theta`` + ``rope_scaling`` (with ``type``) as older config.json files have them."""
    hf = {k: v for k, v in HF.items() if k != "rope_parameters"}
    hf.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = llama_hf.llama_config(hf, "llama", "config.json")
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_factor) == (500.0, "linear", 2.0)
    assert cfg.rope_scaling == {"factor": 2.0}


@pytest.mark.parametrize("model_type,change,match", [
    ("llama", {"attention_bias": True}, "'attention_bias' = True"),
    ("llama", {"mlp_bias": True}, "'mlp_bias' = True"),
    ("llama", {"hidden_act": "gelu"}, "'hidden_act' = 'gelu'"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'rope_type' = 'yarn'"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}, "'dynamic'"),
    ("llama", {"rope_parameters": {"rope_type": "linear"}}, "missing field 'factor'"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta_fast": 1}},
     "'beta_fast'"),
    ("llama", {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("llama", {"attention_dropout": 0.1}, "attention_dropout"),
    ("mistral", {"sliding_window": 16}, "'sliding_window' = 16"),
    ("mistral", {"max_position_embeddings": 8192}, "'sliding_window' = 4096"),   # default
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ("falcon", {}, "unknown model_type 'falcon'"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, model_type, change, match):
    hf = {**HF, "model_type": model_type, **change}
    directory = write_hf(tmp_path / "hf", hf, source())
    with pytest.raises(ValueError, match=match):
        lr.from_pretrained(directory)


def test_mistral_with_a_window_covering_the_context_loads(tmp_path):
    hf = {**HF, "model_type": "mistral", "sliding_window": 32}
    loaded = lr.from_pretrained(write_hf(tmp_path / "hf", hf, source(seed=1)))
    assert np.array_equal(loaded.forward(IDS)[0], source(seed=1).forward(IDS)[0])


def test_sizes_the_files_cannot_hold_are_refused_before_allocating(tmp_path):
    hf = {**HF, "num_hidden_layers": 10**6, "intermediate_size": 10**6}
    with pytest.raises(ValueError, match="needs at least .* parameters, the weights hold"):
        lr.from_pretrained(write_hf(tmp_path / "hf", hf, source()))


def test_trainer_interface_loss(xp):
    model = Llama(LlamaConfig(**SIZES), seed=1, dtype="float64", xp=xp)
    ids = xp.asarray(IDS)
    targets = xp.asarray(np.roll(IDS, -1, axis=1))
    loss, cache = model.loss(ids, targets)
    assert 2.0 < loss < 5.0                                     # about log(30) at init
    model.zero_grad()
    model.loss_backward(cache)
    assert float(abs(model.model.norm.weight.grad).sum()) > 0


def test_qwen2_needs_its_biases(tmp_path):
    directory = write_hf(tmp_path / "hf", {**HF, "model_type": "qwen2"}, source())
    with pytest.raises(ValueError, match=r"missing key 'model\.layers\.0\.self_attn\.q_proj"
                                         r"\.bias'"):
        lr.from_pretrained(directory)


@pytest.mark.parametrize("fields,match", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(head_dim=3), "head_dim must be even"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(rope_type="yarn"), "rope_type 'yarn'"),
    (dict(rope_type="linear"), "needs rope_factor"),
    (dict(rope_factor=2.0), "rope_factor has no use with rope_type 'default'"),
    (dict(rope_type="llama3", rope_factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
          original_max_position_embeddings=16), "high_freq_factor"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_checks_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**SIZES, **fields})


def test_bad_inputs_are_refused():
    model = source()
    with pytest.raises(ValueError, match="ids must lie in"):
        model.forward(np.array([[1, 30]]))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model.forward(IDS, attention_mask=np.ones((2, 3), dtype=np.int64))
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(model.forward(IDS, attention_mask=mask.astype(bool))[0],
                                  model.forward(IDS, attention_mask=mask)[0])
    with pytest.raises(ValueError, match="attention_mask must lie in"):
        model.forward(IDS, attention_mask=2 * mask)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.forward(np.zeros((1, 33), dtype=np.int64))


def test_frozen_model_computes_no_gradient_and_head_on_chosen_rows(xp):
    """Only the last layer's up_proj trains: the others' grads stay None and nothing below
    it runs; logits=False plus head_forward on chosen rows gives those rows' logits and the
    same gradients as the full head with zeros elsewhere."""
    model = Llama(LlamaConfig(**SIZES), seed=1, dtype="float64", xp=xp)
    model.freeze()
    up = model.model.layers[1].mlp.up_proj.weight
    up.trainable = True
    ids = xp.asarray(IDS)
    R = np.random.default_rng(0).standard_normal((2, 4, 30))
    R[:, :2] = 0.0                                              # the loss reads rows 2, 3
    model.zero_grad()
    logits, cache = model.forward(ids)
    model.backward(xp.asarray(R), cache)
    full = to_host(up.grad)
    assert all(p.grad is None for n, p in model.named_parameters() if p is not up)
    model.zero_grad()
    hidden, cache = model.forward(ids, logits=False)
    rows, c_head = model.head_forward(hidden[:, 2:])           # (2, 2, V)
    np.testing.assert_allclose(to_host(rows), to_host(logits)[:, 2:], rtol=1e-13)
    dhidden = xp.zeros(hidden.shape)
    dhidden[:, 2:] = model.head_backward(xp.asarray(R[:, 2:]), c_head)
    model.backward(dhidden, cache)
    np.testing.assert_allclose(to_host(up.grad), full, rtol=1e-12)


def test_rope_tables_follow_the_dtype_the_model_is_loaded_in(tmp_path):
    """A float32 checkpoint loaded as float64 computes float64 tables (equal logits to a
    model built in float64 with the same numbers)."""
    lr.save(source(seed=5), tmp_path / "ckpt")
    wide = lr.from_pretrained(tmp_path / "ckpt", dtype="float64")
    built = Llama(wide.config, dtype="float64")
    for (_, p), (_, q) in zip(built.named_parameters(), wide.named_parameters()):
        p.data = q.data.copy()
    assert np.array_equal(wide.forward(IDS)[0], built.forward(IDS)[0])
    assert wide.forward(IDS)[0].dtype == np.float64
