"""AdaLoRA against PEFT itself (peft/tuners/adalora): the layer, the orthogonality
regulariser, and the rank allocator driven step by step with the same parameters and gradients.

For the allocator both sides get, at every step t, the same parameter values (an SGD step
from the common state, E masks included) and the same gradients; then PEFT runs
``AdaLoraModel.update_and_allocate(t)`` and lowrank its hook's ``after_step`` (a trainer
stand-in with ``step = t``). Compared each step: the budget, Ī and Ū and s = Ī ⊙ Ū of every
A, E, B (rel. 1e-12 float64, 1e-5 float32), the triplet scores, E after masking (exactly) and
PEFT's ``rank_pattern``. Run with ``-s`` for the figures.
"""
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import lowrank as lr  # noqa: E402
from lowrank import backend  # noqa: E402
from lowrank.nn.module import Module  # noqa: E402
from reference.finite_diff import rel_error  # noqa: E402

SHAPES = {"q": (12, 10), "v": (12, 10), "fc": (16, 10)}      # name -> (out, in)
INIT_R, TARGET_R, ALPHA = 6, 3, 8.0
T, TINIT, TFINAL, DELTA_T = 60, 5, 15, 3
STEPS = T + 6                # past T: the frozen pattern keeps applying
FIGURES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if FIGURES:
        print("\nAdaLoRA vs PEFT:")
        for key in sorted(FIGURES):
            print(f"  {key:44s} {FIGURES[key]}")


def note(key, value, worst=max):
    FIGURES[key] = value if key not in FIGURES else worst(FIGURES[key], value)


class TorchNet(torch.nn.Module):
    """The base: a few Linears; ``forward`` returns an object with ``.loss`` (as HF models do),
    which is where PEFT adds its orthogonality regulariser."""

    def __init__(self, dtype, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        for name, (m, n) in SHAPES.items():
            setattr(self, name, torch.nn.Linear(n, m, dtype=dtype))

    def forward(self, x, G):
        loss = sum((getattr(self, name)(x) * G[name]).sum() for name in SHAPES)
        return types.SimpleNamespace(loss=loss)


class Net(Module):
    def __init__(self, layers):
        for name, layer in layers.items():
            setattr(self, name, layer)


def build(xp, torch_dtype, **peft_extra):
    """``(peft_model, our model)`` with identical W0, b0, A, E, B."""
    from peft import AdaLoraConfig, get_peft_model
    config = AdaLoraConfig(target_modules=list(SHAPES), init_r=INIT_R, target_r=TARGET_R,
                           lora_alpha=ALPHA, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T,
                           total_step=T, beta1=0.85, beta2=0.85, lora_dropout=0.0,
                           **peft_extra)
    peft_model = get_peft_model(TorchNet(torch_dtype), config)
    ours = {}
    cfg = lr.adapters.config("adalora", init_r=INIT_R, target_r=TARGET_R, alpha=ALPHA,
                             tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T, total_step=T,
                             orth_reg_weight=config.orth_reg_weight)
    dtype = "float64" if torch_dtype == torch.float64 else "float32"
    inner = peft_model.base_model.model
    for name in SHAPES:
        layer = getattr(inner, name)
        base = layer.get_base_layer()
        W0 = xp.asarray(base.weight.detach().numpy(), dtype=dtype)
        b0 = xp.asarray(base.bias.detach().numpy(), dtype=dtype)
        ours[name] = lr.adapters.AdaptedLinear(W0, b0, cfg)
        for pname in ("lora_A", "lora_E", "lora_B"):
            value = getattr(layer, pname)["default"].detach().numpy()
            getattr(ours[name], pname).data = xp.asarray(value.reshape(
                getattr(ours[name], pname).shape), dtype=dtype)
    return peft_model, Net(ours)


def torch_param(peft_model, name, pname):
    return getattr(getattr(peft_model.base_model.model, name), pname)["default"]


# --- the layer and the regulariser ---------------------------------------------------------

def test_layer_and_regulariser_match_peft(xp):
    peft_model, net = build(xp, torch.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 10))
    G = {name: rng.standard_normal((5, m)) for name, (m, _) in SHAPES.items()}
    for name in SHAPES:                          # nonzero E, random A, B
        for pname in ("lora_A", "lora_E", "lora_B"):
            p = getattr(net, name).__dict__[pname]
            value = rng.standard_normal(p.shape) * 0.3
            p.data = xp.asarray(value)
            with torch.no_grad():
                torch_param(peft_model, name, pname).copy_(
                    torch.as_tensor(value).reshape(torch_param(peft_model, name, pname).shape))
    # PEFT's loss = Σ_layers Σ y ⊙ G + w · mean ‖·‖_F; ours: the layers, then the regulariser
    xt = torch.as_tensor(x).requires_grad_(True)
    # AdaLoraModel.forward (the task models' path) adds the regulariser; a bare PeftModel
    # would call the base model directly and skip it
    loss = peft_model.base_model(xt, {k: torch.as_tensor(v) for k, v in G.items()}).loss
    loss.backward()
    total, dx = 0.0, 0.0
    net.zero_grad()
    for name in SHAPES:
        layer = getattr(net, name)
        y, cache = layer.forward(xp.asarray(x))
        total += float((y * xp.asarray(G[name])).sum())
        dx = dx + backend.to_numpy(layer.backward(xp.asarray(G[name]), cache))
    reg = lr.adapters.adalora.orth_regularizer([getattr(net, n) for n in SHAPES], 0.5)
    err = abs(total + reg - loss.item()) / abs(loss.item())
    note("loss incl. regulariser rel err (float64)", err)
    assert err < 1e-12 and reg > 0.1
    assert rel_error(dx, xt.grad) < 1e-12
    for name in SHAPES:
        for pname in ("lora_A", "lora_E", "lora_B"):
            ref = torch_param(peft_model, name, pname).grad.reshape(-1).numpy()
            ours = backend.to_numpy(getattr(net, name).__dict__[pname].grad).reshape(-1)
            err = rel_error(ours, ref)
            note("grad rel err incl. regulariser (float64)", err)
            assert err < 1e-12, (name, pname)


# --- the allocator -------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_rank_allocator_matches_peft_step_by_step(xp, dtype, tol, ties):
    """``ties``: two triplets each of v and fc never get a gradient, so four scores are exactly 0
    and tie at the threshold of the first masks: PEFT masks all of them (``S <= θ``)."""
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    peft_model, net = build(xp, torch_dtype)
    allocator_peft = peft_model.base_model.rankallocator
    peft_config = peft_model.base_model.peft_config["default"]
    hook = lr.adapters.adalora.AdaLoraLinear.step_hook(net)
    ours = hook.allocator
    rng = np.random.default_rng(1)
    # per-row gradient scales, so that some triplets matter more than others
    scales = {name: np.exp(rng.normal(0.0, 1.0, INIT_R)) for name in SHAPES}
    if ties:
        scales["v"][:2] = scales["fc"][:2] = 0.0
    budgets_peft, budgets_ours, masks_equal, score_err, steps_scored = [], [], True, 0.0, 0
    patterns_compared, below_budget = 0, 0
    for t in range(STEPS):
        for name in SHAPES:
            layer = getattr(net, name)
            for pname in ("lora_A", "lora_E", "lora_B"):
                p = layer.__dict__[pname]
                row_scale = scales[name][None, :] if pname == "lora_B" else \
                    scales[name].reshape((-1,) + (1,) * (len(p.shape) - 1))
                g = (rng.standard_normal(p.shape) * row_scale).astype(dtype)
                new = (backend.to_numpy(p.data).astype(np.float64) - 0.05 * g).astype(dtype)
                p.data, p.grad = xp.asarray(new), xp.asarray(g)
                tp = torch_param(peft_model, name, pname)
                with torch.no_grad():
                    tp.copy_(torch.as_tensor(new).reshape(tp.shape))
                tp.grad = torch.as_tensor(g).reshape(tp.shape).clone()
        peft_model.base_model.update_and_allocate(t)
        hook.after_step(types.SimpleNamespace(step=t, config=types.SimpleNamespace(steps=T)))
        # the budget PEFT used at t (its update_and_allocate does not return it)
        budget = allocator_peft.budget_schedule(t)[0] if t < T - TFINAL else \
            allocator_peft.target_bgt
        budgets_peft.append(budget)
        budgets_ours.append(ours.budget)
        if t < T - TFINAL:        # PEFT resets the EMAs at T - tfinal and updates no more
            steps_scored += 1
            ours_scores = ours.triplet_scores()
            for name in SHAPES:
                for pname in ("lora_A", "lora_E", "lora_B"):
                    key = f"{name}.{pname}.default"
                    shape = getattr(net, name).__dict__[pname].shape
                    for ref, mine in ((allocator_peft.exp_avg_ipt[key], ours.ema_ipt),
                                      (allocator_peft.exp_avg_unc[key], ours.ema_unc),
                                      (allocator_peft._element_score(key), None)):
                        got = ours.element_score(f"{name}.{pname}") if mine is None else \
                            mine[f"{name}.{pname}"]
                        err = rel_error(backend.to_numpy(got), ref.reshape(shape).numpy())
                        score_err = max(score_err, err)
                ipt_A = allocator_peft._element_score(f"{name}.lora_A.default").mean(dim=1)
                ipt_B = allocator_peft._element_score(f"{name}.lora_B.default").mean(dim=0)
                S = allocator_peft._combine_ipt(
                    allocator_peft._element_score(f"{name}.lora_E.default"),
                    torch.stack([ipt_A, ipt_B], dim=1))
                score_err = max(score_err, rel_error(backend.to_numpy(ours_scores[name]), S))
        for name in SHAPES:       # E after masking: the same zeros, the same values
            E_peft = torch_param(peft_model, name, "lora_E").detach().reshape(-1).numpy()
            E_ours = backend.to_numpy(getattr(net, name).lora_E.data)
            masks_equal &= bool(np.array_equal(E_peft == 0, E_ours == 0))
            assert np.array_equal(E_peft, E_ours), (t, name)
        if peft_config.rank_pattern is not None:
            pattern = {k.split(".")[0]: v for k, v in peft_config.rank_pattern.items()}
            assert pattern == lr.adapters.adalora.rank_pattern(net), t
            patterns_compared += 1
            below_budget += sum(sum(v) for v in pattern.values()) < ours.budget
    assert budgets_ours == budgets_peft
    assert score_err < tol
    assert masks_equal
    final = sum(sum(p) for p in lr.adapters.adalora.rank_pattern(net).values())
    assert final == TARGET_R * len(SHAPES)
    ranks = lr.adapters.adalora.realised_ranks(net)
    label = f"{dtype} {'ties' if ties else 'distinct'}"
    note(f"{label}: steps compared", STEPS)
    note(f"{label}: steps with scores compared", steps_scored)
    note(f"{label}: steps with rank_pattern compared", patterns_compared)
    note(f"{label}: steps with fewer active than budget", below_budget)
    note(f"{label}: max rel err of I, U, s, S", score_err)
    note(f"{label}: budgets equal every step", budgets_ours == budgets_peft, min)
    note(f"{label}: masks (E) equal every step", masks_equal, min)
    note(f"{label}: final ranks", str(ranks), lambda a, b: b)
    note("budget sequence t=0..", " ".join(map(str, budgets_ours)), lambda a, b: b)
    assert len(set(ranks.values())) > 1   # the scales make the allocation non-uniform
    if ties:
        assert below_budget > 0           # the ties were hit, and matched
