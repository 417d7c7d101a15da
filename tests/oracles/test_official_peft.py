"""PEFT parity for the inits issue 14 made official (docs/variants.md#pissa-niter-q, #dora).

* ``pissa_niter_q``: PEFT calls ``torch.svd_lowrank(W, r, niter=q)``, whose Gaussian test
  matrix is drawn inside torch. The test wraps PEFT's ``svd_lowrank`` so that torch is seeded
  right before the call, draws the same matrix with ``torch.randn`` and feeds it to lowrank's
  ``svd_lowrank``: the factors then agree to float32 rounding (PEFT computes in float32).
* DoRA with PEFT's inits (gaussian, pissa, pissa_niter_q, olora): the residual base weight,
  the magnitude and, for the deterministic inits, the factors, the output and every gradient
  of lowrank's own init against PEFT's ``LoraConfig(use_dora=True, init_lora_weights=...)``.
Run with ``-s`` to see the largest error of each quantity.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import lowrank as lr  # noqa: E402
from lowrank.adapters.lora import svd_lowrank  # noqa: E402

from tests.helpers.common import to_host  # noqa: E402

SEED = 1234
TOL32 = 2e-5


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class _One(torch.nn.Module):
    def __init__(self, W0):
        super().__init__()
        self.proj = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.as_tensor(W0, dtype=torch.float32))

    def forward(self, x):
        return self.proj(x)


@pytest.fixture
def seeded_svd_lowrank(monkeypatch):
    """PEFT's svd_lowrank with torch seeded to SEED just before it draws its test matrix."""
    from peft.tuners.lora import layer as peft_layer

    def seeded(A, q, niter):
        torch.manual_seed(SEED)
        return torch.svd_lowrank(A, q=q, niter=niter)
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)


def torch_test_matrix(m, n, q):
    torch.manual_seed(SEED)
    return torch.randn(min(m, n), q, dtype=torch.float32).numpy().astype(np.float64)


def peft_layer_for(W0, r, alpha, init, dora):
    config = peft.LoraConfig(target_modules=["proj"], r=r, lora_alpha=alpha, use_dora=dora,
                             init_lora_weights=init, lora_dropout=0.0)
    torch.manual_seed(0)
    model = peft.get_peft_model(_One(W0), config)
    return model, model.base_model.model.proj


@pytest.mark.parametrize("shape", [(24, 16), (12, 20)], ids=["tall", "wide"])
@pytest.mark.parametrize("niter", [0, 2])
def test_pissa_niter_matches_peft_svd_lowrank(seeded_svd_lowrank, shape, niter):
    m, n = shape
    r, alpha = 4, 8.0
    W0 = np.random.default_rng(0).standard_normal(shape) / math.sqrt(n)
    _, layer = peft_layer_for(W0, r, alpha, f"pissa_niter_{niter}", dora=False)
    s = alpha / r
    U, S, V = svd_lowrank(W0.astype(np.float32), r, niter,
                          torch_test_matrix(m, n, r).astype(np.float32))
    root = np.sqrt(S / s)
    A, B = root[:, None] * V.T, U * root
    pA = layer.lora_A["default"].weight.detach().numpy()
    pB = layer.lora_B["default"].weight.detach().numpy()
    pW = layer.get_base_layer().weight.detach().numpy()
    # a singular pair is defined up to a sign, and LAPACK's QR/SVD sign choices under NumPy
    # and torch differ: align each rank's sign (B A, the map, does not depend on it)
    flip = np.sign((A * pA).sum(axis=1))                                 # (r,)
    A, B = A * flip[:, None], B * flip
    errors = {"A": rel(A, pA), "B": rel(B, pB), "delta": rel(s * B @ A, s * pB @ pA),
              "residual": rel(W0 - s * B @ A, pW)}
    print(f"pissa_niter_{niter} {shape}:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL32, errors


def test_pissa_niter_default_sketch_has_r_columns():
    """lowrank's layer draws an (min(m, n), r) test matrix: the PEFT sketch, no oversampling;
    pissa_oversample=10 keeps the wider sketch, nearer the exact PiSSA split."""
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((30, 20)) @ np.diag(np.linspace(1, 0.9, 20)) @ \
        rng.standard_normal((20, 20))
    exact = lr.adapters.AdaptedLinear(W0, None, lr.adapters.config("lora", r=4, init="pissa"))
    errs = {}
    for over in (0, 10):
        cfg = lr.adapters.config("lora", r=4, init="pissa_niter_1", pissa_oversample=over)
        layer = lr.adapters.AdaptedLinear(W0, None, cfg, seed=0)
        errs[over] = rel(to_host(layer.delta_weight()), to_host(exact.delta_weight()))
    assert errs[10] < errs[0]


@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_2", "olora"])
def test_dora_inits_match_peft(seeded_svd_lowrank, init):
    m, n, r, alpha = 20, 12, 3, 6.0
    rng = np.random.default_rng(7)
    W0 = rng.standard_normal((m, n)) / math.sqrt(n)
    x = rng.standard_normal((5, n))
    G = rng.standard_normal((5, m))
    model, player = peft_layer_for(W0, r, alpha, init, dora=True)
    cfg = lr.adapters.config("dora", r=r, alpha=alpha, init=init)
    ours = lr.adapters.AdaptedLinear(W0.astype(np.float32), None, cfg, seed=0)
    if init == "pissa_niter_2":   # the same test matrix as torch's
        from lowrank.adapters.lora import lora_factors

        class _Feed(np.random.Generator):   # a host stream handing out torch's Gaussian draw
            def standard_normal(self, shape, dtype=None):
                return torch_test_matrix(m, n, r).reshape(shape)
        W = W0.astype(np.float32)
        A, B, W_res = lora_factors(W, r, alpha / r, init, _Feed(np.random.PCG64(0)))
        ours.weight.data, ours.lora_A.data, ours.lora_B.data = W_res, A, B
        ours.lora_magnitude_vector.data = np.sqrt(((W_res + (alpha / r) * B @ A) ** 2).sum(1))
    mag = player.lora_magnitude_vector["default"].weight.detach().numpy()
    errors = {"magnitude": rel(to_host(ours.lora_magnitude_vector.data), mag),
              "base_weight": rel(to_host(ours.weight.data),
                                 player.get_base_layer().weight.detach().numpy())}
    if init == "gaussian":   # torch's and lowrank's random streams differ: the distribution
        A = to_host(ours.lora_A.data)
        assert not to_host(ours.lora_B.data).any()
        assert abs(A.std() * r - 1.0) < 0.4     # PEFT: normal_(std=1/r); 36 draws: ±12%/σ
        assert not player.lora_B["default"].weight.detach().numpy().any()
    else:
        pA = player.lora_A["default"].weight.detach().numpy()
        flip = np.sign((to_host(ours.lora_A.data) * pA).sum(axis=1))    # (r,), as above
        ours.lora_A.data = ours.lora_A.data * flip[:, None].astype(np.float32)
        ours.lora_B.data = ours.lora_B.data * flip.astype(np.float32)
        errors["A"] = rel(to_host(ours.lora_A.data), pA)
        errors["B"] = rel(to_host(ours.lora_B.data), player.lora_B["default"].weight.detach())
        xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        y = model(xt)
        y.backward(torch.tensor(G, dtype=torch.float32))
        ours.zero_grad()
        yo, cache = ours.forward(x.astype(np.float32))
        dx = ours.backward(G.astype(np.float32), cache)
        errors["y"] = rel(to_host(yo), y.detach().numpy())
        errors["dx"] = rel(to_host(dx), xt.grad.numpy())
        errors["dA"] = rel(to_host(ours.lora_A.grad), player.lora_A["default"].weight.grad)
        errors["dB"] = rel(to_host(ours.lora_B.grad), player.lora_B["default"].weight.grad)
        errors["dm"] = rel(to_host(ours.lora_magnitude_vector.grad),
                           player.lora_magnitude_vector["default"].weight.grad)
    print(f"dora init={init}:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-4, errors
