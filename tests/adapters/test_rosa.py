"""RoSA (docs/variants.md#rosa): gradients through the sparse part, the gradient-chosen support,
the warm-up/collection schedule, O(nnz) storage, numpy-strict, and save/load/resume."""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.formats import checkpoint
from lowrank.app import workflows as wf
from lowrank.adapters.rosa import RosaLinear, support_size
from lowrank.backend import sparse as bsparse
from lowrank.models import GPT, GPTConfig
from lowrank.training.trainer import Trainer, TrainConfig

from tests.helpers.common import FakeData, gradient_errors, make_layer, perturb, problem, rel_err, to_host

TINY = GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16)
M, N, R, ROWS = 7, 6, 2, 5


def make(xp, **options):
    """A RoSA layer (M, N) with the file's defaults (``options`` override them)."""
    return make_layer(xp, "rosa", (M, N), **{"r": R, "alpha": 3.0, "density": 0.25,
                                             **options})[0]


def collect(layer, xp, steps=3, seed=0):
    """Run forward/backward by hand with collection on; returns the dense numpy score."""
    rng = np.random.default_rng(seed)
    layer.collecting = True
    score = np.zeros((M, N))
    for _ in range(steps):
        x = rng.standard_normal((ROWS, N))
        G = rng.standard_normal((ROWS, M))
        layer.zero_grad()
        _, cache = layer.forward(xp.asarray(x))
        layer.backward(xp.asarray(G), cache)
        score += (G.T @ x) ** 2
    return score


def test_support_is_the_top_of_the_accumulated_squared_w0_gradient(xp):
    layer = make(xp)
    assert not layer.support_selected and layer.nnz == support_size(0.25, M, N) == 10
    score = collect(layer, xp)
    assert rel_err(layer.score, score) < 1e-13
    assert layer.weight.grad is None and layer.w0_grad_products == 3
    layer.select_support()
    want = np.sort(np.argsort(-score.ravel(), kind="stable")[:10])
    np.testing.assert_array_equal(to_host(layer.rosa_indices.data).astype(np.int64), want)
    assert layer.support_selected and layer.score is None and not layer.collecting


def test_top_k_breaks_ties_toward_the_lower_index(xp):
    score = xp.asarray(np.array([[1.0, 3.0, 3.0], [0.0, 3.0, 2.0]]))
    np.testing.assert_array_equal(to_host(bsparse.top_k_flat(score, 2)), [1, 2])
    np.testing.assert_array_equal(to_host(bsparse.top_k_flat(score, 4)), [1, 2, 4, 5])


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
def test_gradients_match_finite_differences(xp, with_mask):
    layer = make(xp, dropout=0.3 if with_mask else 0.0)
    collect(layer, xp)
    layer.select_support()
    perturb(layer, xp)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    errors = gradient_errors(layer, x, G, mask)
    assert set(errors) == {"lora_A", "lora_B", "rosa_values", "x"}
    assert max(errors.values()) < 1e-6, errors
    assert float(abs(to_host(layer.rosa_values.grad)).max()) > 0   # S is in the map


def test_sparse_path_equals_the_effective_weight_path_and_the_dense_delta(xp):
    layer = make(xp, support="random", dropout=0.5)
    perturb(layer, xp)
    x = xp.asarray(np.random.default_rng(2).standard_normal((2, ROWS, N)))
    ones = xp.ones(x.shape)                  # dropout path (CSR multiply) with x_d = x
    y_sparse, cache = layer.forward(x, dropout_mask=ones)
    y_dense, _ = layer.eval().forward(x)     # no dropout: one effective weight
    assert rel_err(y_sparse, y_dense) < 1e-13
    dense = x @ (layer.weight.data + layer.delta_weight()).T + layer.bias.data
    assert rel_err(y_dense, dense) < 1e-13
    S = layer.sparse_matrix()
    assert bsparse.is_sparse(S) and S.nnz == layer.nnz


def test_before_selection_the_layer_is_its_lora(xp):
    layer = make(xp)
    perturb(layer, xp)
    s = layer.scaling
    lora = s * (layer.lora_B.data @ layer.lora_A.data)
    assert float(abs(layer.delta_weight() - lora).max()) == 0.0
    assert layer.sparse_matrix() is None


def test_sparse_storage_is_order_nnz(xp):
    W0 = xp.zeros((512, 128), dtype="float32")
    layer = lr.adapters.AdaptedLinear(W0, None, lr.adapters.config("rosa", density=0.01,
                                                                   support="random"))
    S = layer.sparse_matrix()
    nnz = 655                                            # floor(0.01 * 512 * 128)
    assert layer.nnz == S.nnz == nnz
    sizes = layer.sparse_nbytes()
    assert sizes["total"] == bsparse.nbytes(S) == 4 * nnz + 4 * nnz + 4 * 513 == 7292
    assert sizes["dense"] == 512 * 128 * 4 == 262144
    assert sizes["total"] < 0.03 * sizes["dense"]
    assert layer.rosa_values.data.nbytes == 4 * nnz      # the trainable part: nnz floats
    assert layer._facts()["sparse_bytes"] == 7292


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, True, "dense"])
def test_density_outside_unit_interval_raises(value):
    with pytest.raises(ValueError, match=r"^density must be in \(0, 1\]"):
        lr.adapters.config("rosa", density=value)


@pytest.mark.parametrize("field,value", [("warmup_steps", -1), ("collect_steps", 0),
                                         ("collect_steps", 1.5), ("support", "magnitude")])
def test_invalid_schedule_fields_raise(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        lr.adapters.config("rosa", **{field: value})


def test_sparse_backend_refuses_mixing_under_strict():
    strict = backend.namespace("numpy-strict")
    pattern = bsparse.CSRPattern(strict.asarray([0, 1]), strict.asarray([2, 0]), (2, 3))
    S = pattern.matrix(strict.asarray([1.0, 2.0]))
    assert isinstance(bsparse.to_dense(S), backend.StrictArray)
    with pytest.raises(backend.StrictMixingError):
        bsparse.matmul(S, np.ones((3, 2)))
    with pytest.raises(ValueError, match="different backends"):
        pattern.matrix(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="sorted row-major"):
        bsparse.CSRPattern(strict.asarray([1, 0]), strict.asarray([0, 0]), (2, 3))
    dense = to_host(bsparse.to_dense(S))
    np.testing.assert_array_equal(dense, [[0, 0, 1], [2, 0, 0]])
    X = strict.asarray(np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(to_host(bsparse.matmul(S, X)),
                                  dense @ np.arange(6.0).reshape(3, 2))


def _rosa_model(xp=None, dtype="float64", **options):
    model = GPT(TINY, seed=0, dtype=dtype, xp=xp)
    cfg = lr.adapters.config("rosa", **{"r": 2, "alpha": 4.0, "density": 0.05, **options})
    lr.adapters.inject(model, cfg, ["q", "fc1"])
    return model


def test_trainer_warms_up_collects_then_selects(xp, monkeypatch, tmp_path):
    model = _rosa_model(xp, warmup_steps=2, collect_steps=2)
    layers = [m for _, m in lr.adapters.adapted_modules(model)]
    scores = {}
    original = RosaLinear.select_support

    def recording(self):
        scores[id(self)] = to_host(self.score).copy()
        original(self)
    monkeypatch.setattr(RosaLinear, "select_support", recording)
    trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=6, batch_size=2, lr=1e-2, warmup=0))
    counts, selected = [], []
    for _ in range(6):
        trainer.train_step()
        counts.append(layers[0].w0_grad_products)
        selected.append(layers[0].support_selected)
    assert counts == [0, 0, 1, 2, 2, 2]          # Gᵀx formed on the two collection steps only
    assert selected == [False, False, False, True, True, True]
    for m in layers:
        assert m.w0_grad_products == 2 and m.weight.grad is None and m.score is None
        want = np.sort(np.argsort(-scores[id(m)].ravel(), kind="stable")[:m.nnz])
        np.testing.assert_array_equal(to_host(m.rosa_indices.data).astype(np.int64), want)
        assert float(abs(to_host(m.rosa_values.data)).max()) > 0    # trained after selection
    name = "blocks.0.attn.q.rosa_values"
    assert trainer.optimizer.state[name]["step"] == 2      # moments restarted at selection
    assert len(wf.variant_report(model, tmp_path)) == len(layers)


def test_save_load_round_trip_after_selection(tmp_path, xp):
    model = _rosa_model(xp, warmup_steps=1, collect_steps=1)
    Trainer(model, FakeData(TINY), TrainConfig(steps=4, batch_size=2, lr=1e-2)).fit(progress=False)
    checkpoint.save_adapter(model, tmp_path)
    info = checkpoint.read_adapter_config(tmp_path)
    assert info["modules"]["blocks.0.attn.q"]["extra"]["support_selected"] is True
    loaded = _rosa_model(xp, warmup_steps=1, collect_steps=1)
    assert not any(m.support_selected for _, m in lr.adapters.adapted_modules(loaded))
    checkpoint.load_adapter(loaded, tmp_path)
    for (name, a), (_, b) in zip(lr.adapters.adapted_modules(model),
                                 lr.adapters.adapted_modules(loaded)):
        assert b.support_selected, name
        assert np.array_equal(to_host(a.rosa_indices.data), to_host(b.rosa_indices.data))
    idx = xp.asarray(np.arange(16).reshape(2, 8))
    model.eval(), loaded.eval()
    assert np.array_equal(to_host(model.forward(idx)[0]), to_host(loaded.forward(idx)[0]))


def test_resume_mid_collection_is_exact(tmp_path):
    config = TrainConfig(steps=6, batch_size=2, lr=1e-2, warmup=3)
    options = dict(warmup_steps=1, collect_steps=3, dropout=0.1)

    def fresh():
        model = _rosa_model(**options)
        return model, Trainer(model, FakeData(TINY), config)

    straight, tr = fresh()
    tr.fit(progress=False)
    model, tr = fresh()
    for _ in range(2):                      # stop after the first collection step
        tr.train_step()
    assert tr.hooks[0].state_dict()["scores"]
    checkpoint.save_adapter(model, tmp_path)
    checkpoint.save_training_state(tmp_path, tr.step, tr.optimizer.state_dict(),
                                   tr.rng.bit_generator.state, wf._extra_state(tr))
    resumed, tr2 = fresh()
    wf._resume(tmp_path, tr2, lambda: checkpoint.load_adapter(resumed, tmp_path))
    tr2.fit(progress=False)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(to_host(p.data), to_host(q.data)), name


def test_support_grad_in_blocks_equals_the_dense_product(xp, monkeypatch):
    monkeypatch.setattr(bsparse, "_BLOCK_ELEMENTS", 16)     # 16 // N = 2 support entries a block
    rng = np.random.default_rng(4)
    G, X = rng.standard_normal((8, M)), rng.standard_normal((8, N))
    flat = np.sort(rng.choice(M * N, 11, replace=False))
    pattern = bsparse.CSRPattern.from_flat(xp.asarray(flat), (M, N))
    got = bsparse.support_grad(xp.asarray(G), xp.asarray(X), pattern.rows, pattern.indices)
    np.testing.assert_allclose(to_host(got), (G.T @ X).ravel()[flat], rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(to_host(pattern.flat()), flat)


def test_random_support_never_forms_the_w0_gradient():
    model = _rosa_model(support="random")
    Trainer(model, FakeData(TINY), TrainConfig(steps=3, batch_size=2)).fit(progress=False)
    for _, m in lr.adapters.adapted_modules(model):
        assert m.support_selected and m.w0_grad_products == 0 and m.score is None
