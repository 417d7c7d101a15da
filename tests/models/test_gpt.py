"""The mini GPT (docs/models.md#gpt): parameter names, whole-model finite differences, the torch twin,
AdamW against torch.optim.AdamW, input validation, and frozen parameters costing nothing."""
import math

import numpy as np
import pytest

import lowrank
from lowrank import GPT, GPTConfig, backend
from lowrank.nn.optim import AdamW, clip_grad_norm, lr_at

from tests.helpers.common import rel_err, to_host

TINY = dict(vocab_size=11, context=5, n_layer=2, n_head=2, d_model=8)
FD_EPS = 1e-5
FD_SAMPLES = 10          # entries probed per parameter tensor (all of a smaller one)


def spec_names(L, tied):
    names = ["tok_emb.weight", "pos_emb.weight"]
    for i in range(L):
        b = f"blocks.{i}."
        names += [b + "ln1.weight", b + "ln1.bias"]
        for proj in "qkvo":
            names += [f"{b}attn.{proj}.weight", f"{b}attn.{proj}.bias"]
        names += [b + "ln2.weight", b + "ln2.bias"]
        names += [b + "mlp.fc1.weight", b + "mlp.fc1.bias",
                  b + "mlp.fc2.weight", b + "mlp.fc2.bias"]
    names += ["ln_f.weight", "ln_f.bias"]
    return names if tied else names + ["lm_head.weight"]


def randomize(model, seed=0):
    """Replace the (nearly trivial) init by O(1) random values so every path carries signal."""
    rng = np.random.default_rng(seed)
    xp = model.xp
    for name, p in model.named_parameters():
        v = rng.standard_normal(p.shape) * 0.3
        if name.startswith("ln") or ".ln" in name:
            v = v + (1.0 if name.endswith("weight") else 0.0)
        p.data = backend.asarray(v, dtype=p.dtype, xp=xp)


def batch(xp, B=2, T=5, V=11, seed=1):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, (B, T))
    tgt = rng.integers(0, V, (B, T))
    return backend.asarray(idx, xp=xp), backend.asarray(tgt, xp=xp)


def grad_err(a, b, scale):
    """Relative error with an absolute floor of 1e-3·scale (scale: the global gradient norm).

    The floor is for ``attn.k.bias``: adding a constant to every key shifts each softmax row
    by a constant, so its exact gradient is 0 and both sides hold only rounding noise."""
    a, b = to_host(a), to_host(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-3 * scale))


def global_norm(model):
    return math.sqrt(sum(float(np.sum(to_host(p.grad) ** 2)) for p in model.parameters()))


def host_weights(model):
    return {n: backend.to_numpy(p.data).copy() for n, p in model.named_parameters()}


# --- (a) names and config ----------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_parameter_names_follow_spec(xp, tied):
    cfg = GPTConfig(**TINY, tie_embeddings=tied)
    model = GPT(cfg, xp=xp)
    shapes = dict((n, tuple(p.shape)) for n, p in model.named_parameters())
    assert list(shapes) == spec_names(2, tied)
    d, V = 8, 11
    assert shapes["tok_emb.weight"] == (V, d) and shapes["pos_emb.weight"] == (5, d)
    assert shapes["blocks.1.mlp.fc1.weight"] == (4 * d, d)
    assert shapes["blocks.1.mlp.fc2.weight"] == (d, 4 * d)
    assert shapes["blocks.0.attn.o.bias"] == (d,)
    assert all(p.dtype == np.float32 for p in model.parameters())
    assert isinstance(model.blocks[0].attn.q, lowrank.Linear)
    assert isinstance(model.blocks[1].mlp.fc2, lowrank.Linear)


def test_init_is_deterministic_and_gpt2_like():
    a, b = GPT(GPTConfig(**TINY), seed=3), GPT(GPTConfig(**TINY), seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(to_host(p.data), to_host(q.data), err_msg=n)
    w = host_weights(GPT(GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=32),
                         dtype="float64"))
    assert abs(w["tok_emb.weight"].std() - 0.02) < 0.003
    assert abs(w["blocks.0.mlp.fc2.weight"].std() - 0.01) < 0.002      # 0.02 / sqrt(2 L)
    assert not w["blocks.0.attn.q.bias"].any() and (w["ln_f.weight"] == 1).all()


@pytest.mark.parametrize("field, kwargs", [
    ("vocab_size", dict(vocab_size=0)), ("context", dict(context=-1)),
    ("n_layer", dict(n_layer=1.5)), ("n_head", dict(n_head=0)),
    ("d_model", dict(d_model=9)), ("tie_embeddings", dict(tie_embeddings="no"))])
def test_config_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, **kwargs})


def test_config_round_trips():
    cfg = GPTConfig(**TINY, tie_embeddings=False)
    assert GPTConfig(**cfg.to_dict()) == cfg
    assert cfg.to_dict()["tie_embeddings"] is False


# --- (b) finite differences over every parameter tensor -------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_loss_gradient_matches_fd_for_every_parameter(xp, tied):
    model = GPT(GPTConfig(**TINY, tie_embeddings=tied), dtype="float64", xp=xp)
    randomize(model, seed=int(tied))
    idx, tgt = batch(xp)
    model.zero_grad()
    loss, cache = model.loss(idx, tgt)
    model.loss_backward(cache)
    rng = np.random.default_rng(7)
    scale = global_norm(model)
    worst = 0.0
    for name, p in model.named_parameters():
        host = backend.to_numpy(p.data).copy()
        flat = host.reshape(-1)
        picks = np.arange(flat.size) if flat.size <= FD_SAMPLES else \
            rng.choice(flat.size, FD_SAMPLES, replace=False)
        fd = np.empty(len(picks))
        for j, i in enumerate(picks):
            vals = []
            for step in (FD_EPS, -FD_EPS):
                pert = flat.copy()
                pert[i] += step
                p.data = backend.asarray(pert.reshape(host.shape), xp=xp)
                vals.append(model.loss(idx, tgt)[0])
            fd[j] = (vals[0] - vals[1]) / (2 * FD_EPS)
        p.data = backend.asarray(host, xp=xp)
        err = grad_err(to_host(p.grad).reshape(-1)[picks], fd, scale)
        if name.endswith("attn.k.bias"):
            assert float(np.abs(to_host(p.grad)).max()) < 1e-12 * scale
        worst = max(worst, err)
        assert err < 1e-6, (name, err)
    print(f"max FD rel err (tied={tied}): {worst:.2e}")


# --- (c) torch twin parity ------------------------------------------------------------------

torch_tol = {"float64": 1e-9, "float32": 1e-4}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: torch's OpenMP pool only fights OpenBLAS's spinning threads for the cores."""
    try:
        import torch
    except ImportError:          # the torch tests skip themselves; the others still run
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_twin(model, dtype):
    torch = pytest.importorskip("torch")
    from reference.torch_gpt import TorchGPT
    tdtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    twin = TorchGPT.from_config(model.config.to_dict(), dtype=tdtype)
    return twin.load_numpy(host_weights(model))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("tied", [True, False])
def test_torch_twin_parity(xp, dtype, tied):
    torch = pytest.importorskip("torch")
    model = GPT(GPTConfig(**TINY, tie_embeddings=tied), dtype=dtype, xp=xp)
    randomize(model, seed=2)
    twin = torch_twin(model, dtype)
    idx, tgt = batch(xp, B=3, T=4)           # T < context: pos_emb rows 4.. get zero grad
    model.zero_grad()
    logits, _ = model.forward(idx)
    loss, cache = model.loss(idx, tgt)
    model.loss_backward(cache)
    t_idx, t_tgt = (torch.tensor(backend.to_numpy(a)) for a in (idx, tgt))
    t_loss = twin.loss(t_idx, t_tgt)
    t_loss.backward()
    tol = torch_tol[dtype]
    errs = {"logits": rel_err(logits, twin(t_idx).detach().double().numpy()),
            "loss": abs(loss - t_loss.item()) / abs(t_loss.item())}
    t_grads = twin.numpy_grads()
    assert set(t_grads) == {n for n, _ in model.named_parameters()}
    scale = global_norm(model)
    errs["grads"] = max(grad_err(p.grad, t_grads[n], scale) for n, p in model.named_parameters())
    print(f"torch parity {dtype} tied={tied}:", ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert logits.dtype == np.dtype(dtype)
    assert all(p.grad.dtype == np.dtype(dtype) for p in model.parameters())
    assert all(e <= tol for e in errs.values()), errs


# --- (d) AdamW trajectory vs torch.optim.AdamW ---------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adamw_trajectory_matches_torch(xp, dtype):
    torch = pytest.importorskip("torch")
    model = GPT(GPTConfig(**TINY, tie_embeddings=True), seed=4, dtype=dtype, xp=xp)
    twin = torch_twin(model, dtype)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamW(model.named_parameters(), **hyper)
    t_opt = torch.optim.AdamW(twin.parameters(), **hyper)
    ours, theirs = [], []
    for step in range(10):
        idx, tgt = batch(xp, B=2, seed=100 + step)
        lr = lr_at(step, 3e-3, warmup=3, total=10, min_lr=3e-4)
        opt.zero_grad()
        loss, cache = model.loss(idx, tgt)
        model.loss_backward(cache)
        norm = clip_grad_norm(model.parameters(), 0.5)
        opt.step(lr=lr)
        ours.append(loss)

        for group in t_opt.param_groups:
            group["lr"] = lr
        t_opt.zero_grad()
        t_loss = twin.loss(*(torch.tensor(backend.to_numpy(a)) for a in (idx, tgt)))
        t_loss.backward()
        t_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5).item()
        t_opt.step()
        theirs.append(t_loss.item())
        assert abs(norm - t_norm) <= torch_tol[dtype] * t_norm
    traj = rel_err(np.array(ours), np.array(theirs))
    t_params = {n: p.detach().double().numpy() for n, p in twin.named_parameters()}
    # attn.k.bias has an exactly-zero gradient (see grad_err), so Adam's m/√v turns pure
    # rounding noise into full-size steps on both sides; the model's output ignores it
    params = max(rel_err(p.data, t_params[n]) for n, p in model.named_parameters()
                 if not n.endswith("attn.k.bias"))
    print(f"AdamW {dtype}: loss trajectory {traj:.1e}, final params {params:.1e}")
    assert ours[-1] < ours[0]
    assert traj <= torch_tol[dtype] and params <= torch_tol[dtype], (traj, params)


def test_adamw_resume_is_bit_identical_and_skips_frozen(xp):
    def run(steps, model, opt):
        for step in steps:
            idx, tgt = batch(xp, seed=step)
            opt.zero_grad()
            _, cache = model.loss(idx, tgt)
            model.loss_backward(cache)
            opt.step()

    cfg = GPTConfig(**TINY)
    full = GPT(cfg, seed=5, xp=xp)
    full.blocks[0].attn.k.weight.trainable = False
    opt = AdamW(full.named_parameters(), lr=1e-2)
    run(range(3), full, opt)
    assert "blocks.0.attn.k.weight" not in opt.state and "ln_f.bias" in opt.state
    sd = opt.state_dict()
    weights = host_weights(full)
    run(range(3, 6), full, opt)

    resumed = GPT(cfg, seed=99, xp=xp)
    resumed.blocks[0].attn.k.weight.trainable = False
    for n, p in resumed.named_parameters():
        p.data = backend.asarray(weights[n], xp=xp)
    opt2 = AdamW(resumed.named_parameters(), lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.lr == 1e-2 and opt2.step_count == 3
    run(range(3, 6), resumed, opt2)
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        np.testing.assert_array_equal(to_host(p.data), to_host(q.data), err_msg=n)


def test_adamw_add_param_starts_fresh(xp):
    from lowrank.nn.module import Parameter
    p = Parameter(backend.asarray(np.ones(3), xp=xp))
    opt = AdamW([("a", p)], lr=0.1, weight_decay=0.0)
    for _ in range(3):
        p.grad = backend.asarray(np.full(3, 2.0), xp=xp)
        opt.step()
    q = Parameter(backend.asarray(np.ones(3), xp=xp))
    opt.add_param("b", q)
    q.grad = backend.asarray(np.full(3, 5.0), xp=xp)
    p.grad = None                                   # no gradient: no update, as torch
    before = to_host(p.data)
    opt.step()
    assert opt.state["b"]["step"] == 1 and opt.state["a"]["step"] == 3
    np.testing.assert_array_equal(to_host(p.data), before)
    # the first bias-corrected Adam step moves by lr·g/(|g| + eps) ≈ lr
    np.testing.assert_allclose(to_host(q.data), 1.0 - 0.1, rtol=1e-7)


def test_lr_schedule_and_clip():
    assert lr_at(0, 1.0, 4, 20) == 0.25 and lr_at(3, 1.0, 4, 20) == 1.0
    assert lr_at(4, 1.0, 4, 20) == 1.0
    assert abs(lr_at(12, 1.0, 4, 20, min_lr=0.1) - 0.55) < 1e-12
    assert lr_at(20, 1.0, 4, 20, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 4, 20, min_lr=0.1) == pytest.approx(0.1)
    from lowrank.nn.module import Parameter
    p = Parameter(np.array([3.0, 4.0]))
    p.grad = np.array([3.0, 4.0])
    assert clip_grad_norm([("p", p)], 10.0) == 5.0 and p.grad[1] == 4.0
    assert clip_grad_norm([p], 1.0) == 5.0
    assert math.isclose(float(np.linalg.norm(p.grad)), 1.0, rel_tol=1e-6)


# --- (e) bad input --------------------------------------------------------------------------

def test_bad_input_raises(xp):
    model = GPT(GPTConfig(**TINY), xp=xp)
    with pytest.raises(ValueError, match="11"):
        model.forward(backend.asarray(np.array([[0, 11]]), xp=xp))
    with pytest.raises(ValueError):
        model.forward(backend.asarray(np.array([[-1, 0]]), xp=xp))
    with pytest.raises(ValueError, match="context"):
        model.forward(backend.asarray(np.zeros((1, 6), dtype=np.int64), xp=xp))
    with pytest.raises(ValueError, match="2-D"):
        model.forward(backend.asarray(np.zeros(4, dtype=np.int64), xp=xp))
    with pytest.raises(ValueError, match="integer"):
        model.forward(backend.asarray(np.zeros((1, 4)), xp=xp))
    idx = backend.asarray(np.zeros((1, 4), dtype=np.int64), xp=xp)
    with pytest.raises(ValueError):
        model.loss(idx, backend.asarray(np.full((1, 4), 11), xp=xp))
    if xp is not np:   # a host array handed to a device model is refused, not copied
        with pytest.raises((ValueError, TypeError)):
            model.forward(np.zeros((1, 4), dtype=np.int64))


# --- (f) frozen parameters compute nothing ----------------------------------------------------

def test_frozen_parameters_get_no_gradient(xp, monkeypatch):
    import lowrank.nn.layers
    import lowrank.models.gpt
    calls = []

    def spy(real):
        def wrapped(dy, x, weight, need_dweight=True, need_dbias=True, need_dx=True):
            calls.append(need_dweight)
            return real(dy, x, weight, need_dweight=need_dweight, need_dbias=need_dbias,
                        need_dx=need_dx)
        return wrapped

    cfg = GPTConfig(**TINY)
    ref = GPT(cfg, seed=6, dtype="float64", xp=xp)
    randomize(ref)
    model = GPT(cfg, seed=0, dtype="float64", xp=xp)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        p.data = q.data.copy()
    idx, tgt = batch(xp)

    ref.zero_grad()
    _, cache = ref.loss(idx, tgt)
    ref.loss_backward(cache)

    monkeypatch.setattr(lowrank.nn.layers, "linear_backward", spy(lowrank.nn.layers.linear_backward))
    monkeypatch.setattr(lowrank.models.gpt, "linear_backward", spy(lowrank.models.gpt.linear_backward))
    # only blocks.0.ln1 trains: backward must traverse every block, yet form no dW
    model.freeze()
    keep = {"blocks.0.ln1.weight", "blocks.0.ln1.bias"}
    for n, p in model.named_parameters():
        p.trainable = n in keep
    model.zero_grad()
    _, cache = model.loss(idx, tgt)
    model.loss_backward(cache)
    grads = dict(model.named_parameters())
    assert all((grads[n].grad is None) == (n not in keep) for n in grads)
    assert calls and not any(calls)          # 2 x 6 Linears + head, never a weight gradient
    assert len(calls) == 2 * 6 + 1
    ref_grads = dict(ref.named_parameters())
    for n in keep:
        assert rel_err(grads[n].grad, ref_grads[n].grad) < 1e-12

    # only ln_f trains: the blocks are not even traversed
    calls.clear()
    for n, p in model.named_parameters():
        p.trainable = n.startswith("ln_f")
    model.zero_grad()
    _, cache = model.loss(idx, tgt)
    model.loss_backward(cache)
    assert calls == [False]                  # the head's dx only
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"ln_f.weight", "ln_f.bias"}
    assert rel_err(grads["ln_f.weight"].grad, ref_grads["ln_f.weight"].grad) < 1e-12
