"""ReLoRA (docs/variants.md#relora): gradients, rank growth through restarts, the merge keeps the
output, optimizer-moment pruning, the jagged learning rate, config validation, exact resume."""
import copy

import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.nn import optim
from lowrank.adapters.relora import ReLoraHook, ReLoraLinear, restart_lr_factor
from lowrank.models import GPT, GPTConfig
from lowrank.training.trainer import Trainer, TrainConfig

from tests.helpers.common import FakeData, gradient_errors, make_layer, perturb, pretrain_tiny_base, problem, rel_err, to_host

TINY = GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16)
M, N, ROWS = 6, 5, 4


def tiny_model(xp=None, dtype="float64", **options):
    model = GPT(TINY, seed=0, dtype=dtype, xp=xp)
    cfg = {"r": 2, "alpha": 4.0, "reset_interval": 3, "restart_warmup": 2, **options}
    lr.adapters.inject(model, lr.adapters.config("relora", **cfg), ["q", "v"])
    return model


def trainer_for(model, steps, **train):
    return Trainer(model, FakeData(TINY), TrainConfig(**{"steps": steps, "batch_size": 2, "lr": 1e-2,
                                                    "warmup": 1, **train}))


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
def test_gradients_match_finite_differences_after_a_restart(xp, with_mask):
    m, _, _ = make_layer(xp, "relora", (M, N), r=2, alpha=3.0,
                         dropout=0.3 if with_mask else 0.0)
    perturb(m, xp)
    m.restart()                                  # W0 absorbed a cycle; A re-drawn, B = 0
    perturb(m, xp, seed=2)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    errors = gradient_errors(m, x, G, mask)
    assert set(errors) == {"lora_A", "lora_B", "x"}
    assert max(errors.values()) < 1e-6, errors
    assert m.weight.grad is None


def test_restart_keeps_the_output_and_merges_into_the_base(xp):
    model = tiny_model(xp, reset_interval=100)
    trainer = trainer_for(model, 4)
    trainer.fit(progress=False)
    idx = xp.asarray(np.random.default_rng(2).integers(0, TINY.vocab_size, (2, TINY.context)))
    model.eval()
    before, _ = model.forward(idx)
    layers = lr.adapters.adapted_modules(model)
    effective = [m.effective_weight().copy() for _, m in layers]
    trainer.hooks[0].restart(trainer.optimizer)
    after, _ = model.forward(idx)
    assert rel_err(after, before) <= 1e-12
    assert np.array_equal(to_host(after), to_host(before))          # bit-identical, in fact
    for (_, m), W in zip(layers, effective):
        assert np.array_equal(to_host(m.weight.data), to_host(W))   # W0 <- W0 + sBA
        assert float(abs(m.lora_B.data).max()) == 0.0 and m.restarts == 1
        bound = 1.0 / np.sqrt(m.in_features)                        # kaiming A
        assert 0.0 < float(abs(m.lora_A.data).max()) <= bound


def test_two_restarts_give_rank_above_r(xp):
    """K = 3, 8 steps: restarts after steps 3 and 6, then rank(W - W_init) > r = 2."""
    model = tiny_model(xp)
    W_init = {n: to_host(m.weight.data).copy() for n, m in lr.adapters.adapted_modules(model)}
    trainer = trainer_for(model, 8)
    trainer.fit(progress=False)
    for name, m in lr.adapters.adapted_modules(model):
        assert m.restarts == 2
        S = np.linalg.svd(to_host(m.effective_weight()) - W_init[name], compute_uv=False)
        rank = int((S > 1e-8 * S[0]).sum())
        assert rank > 2 and rank <= 3 * 2, (name, S)
    probe = trainer.hooks[0].layers[0][1]
    assert rel_err(probe.weight_change(), to_host(probe.effective_weight()) -
                   W_init[trainer.hooks[0].layers[0][0]]) < 1e-6
    line = ReLoraLinear.report(model, None)[0]
    assert line.startswith("ReLoRA: 2 restarts (every 3 steps") and \
        "rank(W - W_init) of blocks.0.attn.q: 6 (r = 2" in line


@pytest.mark.parametrize("method,ratio", [("random", 0.5), ("random", 0.999),
                                          ("magnitude", 0.75), ("magnitude", 1.0)])
def test_moment_pruning_ratio_is_realised(xp, method, ratio):
    model = tiny_model(xp, reset_interval=100, optimizer_reset=method, reset_ratio=ratio)
    trainer = trainer_for(model, 4)
    trainer.fit(progress=False)
    state = trainer.optimizer.state
    names = [n for n in state if ".lora_" in n]
    before = {(n, k): to_host(state[n][k]).copy()
              for n in names for k in ("exp_avg", "exp_avg_sq")}
    steps = {n: state[n]["step"] for n in names}
    trainer.hooks[0].restart(trainer.optimizer)
    total = zeros = 0
    for (n, k), old in before.items():
        new = to_host(state[n][k])
        kept = new != 0
        assert np.array_equal(new[kept], old[kept])        # survivors are untouched
        assert (old != 0).all()
        total, zeros = total + new.size, zeros + int((~kept).sum())
        if method == "magnitude" and ratio < 1.0:          # the smallest |v| go first
            assert np.abs(old[~kept]).max() <= np.abs(old[kept]).min()
            assert abs((~kept).mean() - ratio) <= 1.0 / new.size + 1e-12
    assert {n: state[n]["step"] for n in names} == steps   # AdamW step counters kept
    realised = zeros / total
    tolerance = 4 * np.sqrt(ratio * (1 - ratio) / total) + 1e-9 if method == "random" else 0.02
    assert abs(realised - ratio) <= tolerance, (realised, total)


def test_jagged_learning_rate_ramp_option():
    """schedule="ramp": steps 12, warm-up 2, cosine 1e-2 -> 1e-3; K = 4 (restarts after steps
    4 and 8), restart_warmup 2: steps 4 and 8 at half the schedule's rate, the rest at full."""
    model = tiny_model(reset_interval=4, restart_warmup=2, schedule="ramp")
    trainer = trainer_for(model, 12, warmup=2, min_lr=1e-3)
    got = [trainer.lr_at(s) for s in range(12)]
    base = [optim.lr_at(s, 1e-2, 2, 12, 1e-3) for s in range(12)]
    factor = [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1, 1, 1]
    assert got == [b * f for b, f in zip(base, factor)]
    assert [restart_lr_factor(s, 5, 3) for s in range(12)] == \
        [1, 1, 1, 1, 1, 1 / 3, 2 / 3, 1, 1, 1, 1 / 3, 2 / 3]
    history = trainer.fit(progress=False)
    assert [h["lr"] for h in history] == got
    assert [m.restarts for _, m in lr.adapters.adapted_modules(model)] == [2] * 4


def test_invalid_config_raises():
    for field, value in [("reset_interval", 0), ("reset_interval", 1.5), ("restart_warmup", -1),
                         ("optimizer_reset", "zero"), ("reset_ratio", 1.5),
                         ("reset_ratio", -0.1), ("schedule", "cosine"), ("min_lr_ratio", 0.0),
                         ("min_lr_ratio", 1.5), ("trainable_scaling", 1)]:
        with pytest.raises(ValueError, match=rf"^{field} "):
            lr.adapters.config("relora", **{field: value})
    with pytest.raises(ValueError, match=r"^restart_warmup must be an integer in 0\.\.reset_"):
        lr.adapters.config("relora", reset_interval=3, restart_warmup=4)


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_resume_is_bit_identical(xp, method):
    """10 steps straight (restarts after 3, 6, 9), or 5 + (fresh model: weights, W0
    included, and the trainer state restored) + 5."""
    def fresh():
        model = tiny_model(xp, dropout=0.1, optimizer_reset=method, reset_ratio=0.5)
        return model, trainer_for(model, 10)

    straight, tr = fresh()
    tr.fit(progress=False)
    half, tr = fresh()
    for _ in range(5):
        tr.train_step()
    weights = {n: backend.to_numpy(p.data).copy() for n, p in half.named_parameters()}
    state = copy.deepcopy(tr.state_dict())
    resumed, tr = fresh()
    for n, p in resumed.named_parameters():
        p.data = backend.asarray(weights[n], dtype=p.dtype, xp=xp)
    tr.load_state_dict(state)
    tr.fit(progress=False)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(backend.to_numpy(p.data), backend.to_numpy(q.data)), name
    assert [m.restarts for _, m in lr.adapters.adapted_modules(resumed)] == [3] * 4
    assert ReLoraLinear.report(resumed, None) == ReLoraLinear.report(straight, None)


def test_the_file_keeps_the_merged_base_and_a_foreign_base_raises(tmp_path):
    """The merged cycles live in W0, so the adapter file keeps it (``base_layer.weight``) and
    a load into a pristine base reproduces the model exactly; a layer whose W0 is not the
    saved one refuses the metadata of a restarted adapter instead of silently giving
    another model."""
    from lowrank.formats import checkpoint
    from lowrank.files.storage import read_safetensors
    model = tiny_model()
    trainer_for(model, 5).fit(progress=False)                # one restart
    checkpoint.save_adapter(model, tmp_path)
    saved = read_safetensors(tmp_path / checkpoint.ADAPTER_FILE)
    assert "blocks.0.attn.q.base_layer.weight" in saved
    fresh = tiny_model()
    checkpoint.load_adapter(fresh, tmp_path)
    idx = np.arange(16).reshape(2, 8) % TINY.vocab_size
    assert np.array_equal(model.eval().forward(idx)[0], fresh.eval().forward(idx)[0])
    extra = checkpoint.read_adapter_config(tmp_path)["modules"]["blocks.0.attn.q"]["extra"]
    assert extra["restarts"] == 1
    pristine = tiny_model().blocks[0].attn.q
    with pytest.raises(ValueError, match="saved after 1 restarts"):
        pristine.load_adapter_metadata(extra)


def test_hook_is_picked_by_the_trainer():
    model = tiny_model()
    trainer = trainer_for(model, 2)
    assert len(trainer.hooks) == 1 and isinstance(trainer.hooks[0], ReLoraHook)
    assert trainer.hooks[0].layers[0][1].history is not None


def test_finetune_resume_and_load_finetuned(tmp_path):
    """workflows.finetune --resume and load_finetuned after restarts (float64, CPU)."""
    from lowrank.app import workflows as wf
    data = pretrain_tiny_base(tmp_path)
    options = {"r": 2, "alpha": 4.0, "reset_interval": 3, "restart_warmup": 1, "dropout": 0.1}

    def run(out, steps, resume=False):   # restarts after steps 3 and 6 either way
        return wf.finetune(out, tmp_path / "base", "relora", ["q", "v"], options, data,
                           TrainConfig(steps=steps, batch_size=4, lr=1e-2), resume=resume,
                           progress=False)
    straight = run(tmp_path / "one", 8)
    run(tmp_path / "two", 4)
    resumed = run(tmp_path / "two", 8, resume=True)
    assert straight.report == resumed.report
    assert straight.report[0].startswith("ReLoRA: 2 restarts")
    a, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "one")
    b, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "two")
    for (name, p), (_, q), (_, s) in zip(a.named_parameters(), b.named_parameters(),
                                         straight.model.named_parameters()):
        assert np.array_equal(p.data, q.data) and np.array_equal(p.data, s.data), name


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
def test_trainable_scaling_gradients_match_finite_differences(xp, with_mask):
    """trainable_scaling: the scale is tanh(θ) of ``lora_scaling`` (θ = 1 at init); dθ, dA,
    dB, dx against finite differences; a restart merges with tanh(θ) and sets θ = 0."""
    m, _, _ = make_layer(xp, "relora", (M, N), r=2, alpha=3.0, trainable_scaling=True,
                         dropout=0.3 if with_mask else 0.0)
    assert float(m.lora_scaling.data[0]) == 1.0
    perturb(m, xp)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    errors = gradient_errors(m, x, G, mask)
    assert set(errors) == {"lora_A", "lora_B", "lora_scaling", "x"}
    assert max(errors.values()) < 1e-6, errors
    W = to_host(m.weight.data) + np.tanh(to_host(m.lora_scaling.data)[0]) * \
        to_host(m.lora_B.data) @ to_host(m.lora_A.data)
    m.restart()
    np.testing.assert_allclose(to_host(m.weight.data), W, rtol=1e-13, atol=1e-14)
    assert float(m.lora_scaling.data[0]) == 0.0      # official merge_and_reinit: zeros_(scaling)
