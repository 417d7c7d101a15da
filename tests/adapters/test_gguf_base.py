"""A GGUF base kept in its blocks (docs/gguf.md#kept-quantized): dequantisation bit for bit
the ``gguf`` package's, products tile by tile equal to the dense ones, the weights kept with
no float copy, and every registered variant training on top with the gradients it gets on the
dequantised float base."""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.quant import GGUFBlocksParameter, base_bytes, quantize_base
from lowrank.quant import gguf_blocks

from tests.helpers.gguf_writer import T, write_tiny_gguf  # noqa: E402  (skips without gguf)

gguf = pytest.importorskip("gguf")
TYPES = {"attn_q.weight": T.Q8_0, "attn_k.weight": T.Q4_0, "attn_v.weight": T.Q4_1,
         "attn_output.weight": T.F16, "ffn_gate.weight": T.Q4_1, "ffn_up.weight": T.Q8_0,
         "ffn_down.weight": T.Q4_0, "token_embd.weight": T.Q8_0, "output.weight": T.Q4_1}
SMALL = {"hidden": 64, "ffn": 96, "heads": 2, "kv_heads": 1}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("kept") / "tiny.gguf"
    write_tiny_gguf(path, types=TYPES, shape=SMALL)
    return path


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "F16"])
@pytest.mark.parametrize("shape", [(7, 64), (33, 96)])
def test_dequantised_values_are_the_gguf_packages_bit_for_bit(xp, qtype, shape):
    rng = np.random.default_rng(3)
    W = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, (shape[0], 1))).astype(np.float32)
    W[0, :32] = 0.0                       # an all-zero block: scale 0
    W[1, 32:64] = 5.0                     # a constant block (Q4_1: d = 0, m = 5)
    raw = W.astype(np.float16).view(np.uint8) if qtype == "F16" else \
        gguf.quants.quantize(W, getattr(T, qtype))
    expected = gguf.quants.dequantize(raw, getattr(T, qtype)).astype(np.float32)
    p = GGUFBlocksParameter(raw, qtype, shape, xp=xp)
    got = backend.to_numpy(p.data)
    assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()
    assert p.nbytes() == raw.nbytes and p.grad is None and not p.trainable
    assert np.array_equal(backend.to_numpy(p.rows(3, 6)), expected[3:6])
    ids = xp.asarray(np.array([[2, 0], [5, 2]]))
    assert np.array_equal(backend.to_numpy(p.take(ids)), expected[[[2, 0], [5, 2]]])


@pytest.mark.parametrize("tile_bytes", [4 * 64 * 3, 1 << 20])   # 3-row tiles, one tile
def test_tiled_products_equal_the_dense_ones(xp, monkeypatch, tile_bytes):
    monkeypatch.setattr(gguf_blocks, "TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(4)
    W = rng.standard_normal((10, 64)).astype(np.float32)
    p = GGUFBlocksParameter(gguf.quants.quantize(W, T.Q4_1), "Q4_1", W.shape, "float64", xp=xp)
    D = p.data
    x, G, b = (xp.asarray(rng.standard_normal(s)) for s in ((5, 64), (5, 10), (10,)))
    assert float(abs(p.matmul_t(x, b) - (x @ D.T + b)).max()) < 1e-12
    assert float(abs(p.matmul(G) - G @ D).max()) < 1e-12
    out = xp.ones((5, 64))
    p.matmul(G, out=out)
    assert float(abs(out - (1.0 + G @ D)).max()) < 1e-12
    with pytest.raises(RuntimeError, match="frozen"):
        p.accumulate(D)


def test_bad_blocks_are_refused_in_one_line():
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        GGUFBlocksParameter(np.zeros((2, 40), np.uint8), "Q8_0", (2, 40))
    with pytest.raises(ValueError, match="has 68 bytes, got 60"):
        GGUFBlocksParameter(np.zeros((2, 60), np.uint8), "Q8_0", (2, 64))
    with pytest.raises(ValueError, match="qtype must be one of"):
        GGUFBlocksParameter(np.zeros((2, 60), np.uint8), "Q6_K", (2, 64))


def test_keep_swaps_every_quantized_weight_and_holds_only_blocks(tiny):
    model = lr.from_pretrained(tiny)
    model.freeze()
    floats = {n: backend.to_numpy(p.data).copy() for n, p in model.named_parameters()}
    report = quantize_base(model, "keep")
    assert report["modules"] == 2 * 7 + 2     # every linear of 2 layers, embedding, head
    assert report["types"] == {"Q8_0": 5, "Q4_0": 4, "Q4_1": 5, "F16": 2}
    assert report["kept_float"] == []
    held = base_bytes(model)
    assert held["kept"] == report["bytes"] and held["float"] == 4 * 64 * 5   # norms only
    for name, p in model.named_parameters():
        if isinstance(p, GGUFBlocksParameter):
            assert p.is_quantized and np.array_equal(backend.to_numpy(p.data), floats[name])
    with pytest.raises(ValueError, match="needs a model read from a GGUF file"):
        quantize_base(lr.models.build(lr.models.entry("llama").config_cls(
            vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=2)), "keep")


def _pair(path, variant, dtype="float64"):
    """The same adapted model twice: on the dequantised float base, on the kept blocks."""
    models = []
    for keep in (False, True):
        model = lr.from_pretrained(path, dtype=dtype)
        lr.adapters.inject(model, lr.adapters.config(variant, r=2, alpha=4.0), TARGETS, seed=5)
        report = quantize_base(model, "keep") if keep else None
        models.append((model, report))
    return models


def _step(model, ids, targets):
    model.zero_grad()
    loss, cache = model.loss(ids, targets)
    model.loss_backward(cache)
    grads = {n: backend.to_numpy(p.grad).copy() for n, p in model.named_parameters()
             if p.trainable}
    for _, p in model.named_parameters(trainable_only=True):
        p.data -= 0.05 * p.grad
    return float(loss), grads


@pytest.mark.parametrize("variant", lr.adapters.available())
def test_every_variant_trains_on_the_kept_base_as_on_the_float_one(tiny, variant):
    (plain, _), (kept, report) = _pair(tiny, variant)
    if variant == "svd":   # its init rewrites the base (W0 - the top-r part): that stays float
        assert len(report["kept_float"]) == 2 * 7 and report["modules"] == 2
    else:
        assert report["kept_float"] == [] and report["modules"] == 16
    rng = np.random.default_rng(0)
    ids = backend.asarray(rng.integers(0, 300, (2, 9)))
    targets = backend.asarray(rng.integers(0, 300, (2, 9)))
    for _ in range(3):
        loss_p, grads_p = _step(plain, ids, targets)
        loss_k, grads_k = _step(kept, ids, targets)
        assert grads_p.keys() == grads_k.keys() and grads_p
        assert abs(loss_k - loss_p) <= 1e-12 * abs(loss_p)
        for name, g in grads_p.items():
            scale = max(float(np.abs(g).max()), 1e-30)
            assert float(np.abs(grads_k[name] - g).max()) <= 1e-10 * scale, name
    for _, p in kept.named_parameters():
        assert not isinstance(p, GGUFBlocksParameter) or (p.is_quantized and p.grad is None)


def test_merging_onto_the_kept_base_keeps_float_and_unmerge_restores_it(tiny):
    (plain, _), (kept, _) = _pair(tiny, "lora")
    layer = kept.model.layers[0].mlp.down_proj
    for p in kept.parameters(trainable_only=True):
        p.data += 0.01
    before = backend.to_numpy(layer.weight.data).copy()
    layer.merge()
    assert not layer.weight.is_quantized
    layer.unmerge()
    assert float(np.abs(backend.to_numpy(layer.weight.data) - before).max()) < 1e-12


@pytest.mark.slow
def test_smollm2_kept_base_is_under_a_fifth_of_float32_with_the_same_logits():
    from lowrank.files.locate import smollm2_file
    try:
        smollm2_file()
    except ValueError as exc:
        pytest.skip(f"SmolLM2 wheel absent: {exc}")
    model = lr.from_pretrained("smollm2")
    model.freeze()
    ids = backend.asarray(np.array([[1, 504, 3459, 314, 2681, 30, 2]]))
    before = backend.to_numpy(model.forward(ids)[0]).copy()
    float_bytes = sum(base_bytes(model).values())
    report = quantize_base(model, "keep")
    held = base_bytes(model)
    assert report["types"] == {"Q4_1": 210, "Q8_0": 1}
    assert (held["kept"] + held["float"]) <= 0.2 * float_bytes
    after = backend.to_numpy(model.forward(ids)[0])
    assert float(np.abs(after - before).max() / np.abs(before).max()) < 1e-5
