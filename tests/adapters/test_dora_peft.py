"""DoRA parity with PEFT ``LoraConfig(use_dora=True)`` (docs/variants.md#dora), float32, rel. error < 1e-5.

Our factors (nonzero B, a magnitude moved off its init) are copied into PEFT; PEFT's dropout is
replaced by the same fixed mask (``reference.peft_dora.MaskDropout``). PEFT detaches the weight
norm, so the comparison is with our default ``exact_norm_grad=False``. A float64 run of the same
comparison must agree to 1e-12. Run with ``-s`` to see the largest error of each quantity.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import lowrank as lr  # noqa: E402
from lowrank import backend  # noqa: E402
from reference import finite_diff, peft_dora  # noqa: E402

from tests.helpers.common import error_log  # noqa: E402

M, N_IN, R, ROWS = 24, 16, 4, 10
ALPHA, P_DROP = 8.0, 0.25
TOL = {"float32": 1e-5, "float64": 1e-12}
ERRORS, _report_errors = error_log("dora vs PEFT")


def check(label, ours, ref, dtype):
    err = finite_diff.rel_error(backend.to_numpy(ours), ref)
    ERRORS.check(label, err, TOL[dtype])


def problem(seed=0, lead=(ROWS,)):
    """Host float64 ``W0, b0, x, G, mask, A, B, m`` (B nonzero, m off the row norms)."""
    rng = np.random.default_rng(200 + seed)
    W0 = rng.standard_normal((M, N_IN)) / math.sqrt(N_IN)
    b0 = rng.standard_normal(M)
    x = rng.standard_normal((*lead, N_IN))
    G = rng.standard_normal((*lead, M))
    mask = (rng.random(x.shape) >= P_DROP) / (1.0 - P_DROP)
    A = rng.standard_normal((R, N_IN)) / math.sqrt(N_IN)
    B = 0.3 * rng.standard_normal((M, R))
    mag = np.linalg.norm(W0, axis=1) * (1.0 + 0.2 * rng.standard_normal(M))
    return W0, b0, x, G, mask, A, B, mag


def our_run(xp, dtype, W0, b0, x, G, mask, A, B, mag, rslora):
    cfg = lr.adapters.config("dora", r=R, alpha=ALPHA, rslora=rslora,
                             dropout=P_DROP if mask is not None else 0.0)
    layer = lr.adapters.AdaptedLinear(xp.asarray(W0, dtype=dtype), xp.asarray(b0, dtype=dtype),
                                      cfg, seed=0)
    magnitude_init = layer.lora_magnitude_vector.data.copy()
    layer.lora_A.data = xp.asarray(A, dtype=dtype)
    layer.lora_B.data = xp.asarray(B, dtype=dtype)
    layer.lora_magnitude_vector.data = xp.asarray(mag, dtype=dtype)
    xd = xp.asarray(x, dtype=dtype)
    mask_d = None if mask is None else xp.asarray(mask, dtype=dtype)
    layer.zero_grad()
    y, cache = layer.forward(xd, dropout_mask=mask_d)
    dx = layer.backward(xp.asarray(G, dtype=dtype), cache)
    assert y.dtype == np.dtype(dtype) and dx.dtype == np.dtype(dtype)
    out = {"y": y, "dx": dx, "dA": layer.lora_A.grad, "dB": layer.lora_B.grad,
           "dm": layer.lora_magnitude_vector.grad, "magnitude_init": magnitude_init,
           "scaling": layer.scaling}
    layer.merge()
    out["merged"] = layer.weight.data.copy()
    layer.unmerge()
    out["unmerged"] = layer.weight.data
    return out


CASES = [(False, False, (ROWS,)), (True, False, (ROWS,)), (False, True, (ROWS,)),
         (True, True, (ROWS,)), (True, False, (2, 5)), (True, True, (2, 5))]
IDS = ["plain", "dropout", "rslora", "rslora-dropout", "3d", "3d-rslora"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_mask,rslora,lead", CASES, ids=IDS)
def test_dora_matches_peft(xp, dtype, with_mask, rslora, lead):
    W0, b0, x, G, mask, A, B, mag = problem(lead=lead)
    mask = mask if with_mask else None
    ours = our_run(xp, dtype, W0, b0, x, G, mask, A, B, mag, rslora)
    ref = peft_dora.peft_dora_forward_backward(
        W0, b0, A, B, mag, R, ALPHA, x, G, mask=mask, rslora=rslora,
        dtype=torch.float32 if dtype == "float32" else torch.float64)
    assert ours["scaling"] == pytest.approx(ref["scaling"], rel=1e-15)
    assert not ref["frozen_weight_grad"]
    tag = f"{dtype} {'dropout' if with_mask else 'plain'}"
    for key in ("y", "dA", "dB", "dm", "dx", "magnitude_init", "merged", "unmerged"):
        check(f"{tag} {key}", ours[key], ref[key], dtype)
