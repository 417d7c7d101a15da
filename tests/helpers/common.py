"""What tests share: layer factories, the finite-difference check, error reporting, fake data.

The finite-difference loop and the relative error are ``reference.finite_diff``'s (one of
each in the repository); everything here builds on them.
"""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from reference.finite_diff import numerical_gradient, rel_error

rel_err = rel_error   # ‖a − b‖ / max(‖a‖, ‖b‖, tiny), on host float64


def to_host(a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a), dtype=np.float64)


# --- layers ----------------------------------------------------------------------------------

def make_layer(xp, variant, shape=(6, 5), dtype="float64", seed=0, W0=None, base_seed=None,
               **fields):
    """``(layer, W0, b0)``: an adapted ``shape`` = (m, n) linear with a standard-normal base
    (or ``W0``, a host array) and bias drawn from ``base_seed`` (default: ``seed``, which also
    seeds the adapter's init); ``fields`` are config fields."""
    rng = np.random.default_rng(seed if base_seed is None else base_seed)
    W0 = rng.standard_normal(shape) if W0 is None else W0
    b0 = rng.standard_normal(shape[0])
    W0, b0 = xp.asarray(W0, dtype=dtype), xp.asarray(b0, dtype=dtype)
    cfg = lr.adapters.config(variant, **fields)
    return lr.adapters.AdaptedLinear(W0, b0, cfg, seed=seed), W0, b0


def perturb(layer, xp, seed=1, scale=0.5, frozen=False):
    """Move every trainable array (every one with ``frozen``) off its init, so no gradient is
    trivially zero (B = 0 would make dA = 0)."""
    rng = np.random.default_rng(seed)
    for name, p in layer.named_parameters():
        base = name in ("weight", "bias") and not p.trainable
        if p.trainable or (frozen and not base and p.dtype.kind == "f"):
            p.data += xp.asarray(scale * rng.standard_normal(p.shape), dtype=p.dtype)


def problem(xp, shape=(6, 5), rows=4, seed=7, dropout=0.0):
    """``(x (*rows, n), G (*rows, m), mask or None)`` in float64 (``rows`` an int or a tuple
    of leading sizes); the mask keeps a 1 − dropout share, scaled by 1 / (1 − dropout)."""
    rng = np.random.default_rng(seed)
    m, n = shape
    lead = (rows,) if isinstance(rows, int) else tuple(rows)
    x = xp.asarray(rng.standard_normal((*lead, n)))
    G = xp.asarray(rng.standard_normal((*lead, m)))
    mask = xp.asarray((rng.random((*lead, n)) > dropout) / (1.0 - dropout)) if dropout else None
    return x, G, mask


# --- the finite-difference check --------------------------------------------------------------

def layer_fd_gradient(layer, array, x, G, mask=None, eps: float = 1e-6) -> np.ndarray:
    """Central differences of ``L = Σ layer.forward(x)·G`` with respect to every entry of
    ``array`` (perturbed in place and restored; any backend), as a host float64 array."""
    return numerical_gradient(
        lambda: float((layer.forward(x, dropout_mask=mask)[0] * G).sum()), array, eps)


def gradient_errors(layer, x, G, mask=None, context=None) -> dict:
    """``{name: relative error}`` of the backward's gradient of ``L = Σ forward(x)·G`` against
    central differences, for every trainable parameter and for x. Finite differences run
    inside ``context``, by default ``layer.finite_difference_context()`` (DoRA holds its
    norm there)."""
    layer.zero_grad()
    _, cache = layer.forward(x, dropout_mask=mask)
    dx = layer.backward(G, cache)
    params = dict(layer.named_parameters(trainable_only=True))
    assert params, "a layer with nothing to train"
    analytic = {name: p.grad.copy() for name, p in params.items()}
    arrays = {name: p.data for name, p in params.items()}
    analytic["x"], arrays["x"] = dx, x
    with layer.finite_difference_context() if context is None else context:
        return {name: rel_err(analytic[name], layer_fd_gradient(layer, array, x, G, mask))
                for name, array in arrays.items()}


# --- error reporting (run with -s) ------------------------------------------------------------

class ErrorLog:
    """The largest relative error seen per label; ``check`` asserts it under ``tol``."""

    def __init__(self, title: str):
        self.title, self.max = title, {}

    def check(self, label: str, err: float, tol: float = 1e-6) -> None:
        self.max[label] = max(self.max.get(label, 0.0), err)
        assert err < tol, f"{label}: {err:.3e} >= {tol:.0e}"

    def print(self) -> None:
        if self.max:
            width = max(len(k) for k in self.max) + 2
            print(f"\nlargest relative errors ({self.title}):")
            for key in sorted(self.max):
                print(f"  {key:{width}s} {self.max[key]:.3e}")


def error_log(title: str):
    """``(log, fixture)``: assign both at module level (``ERRORS, _report = error_log("x")``);
    the autouse fixture prints the log when the module's tests are done."""
    log = ErrorLog(title)

    @pytest.fixture(scope="module", autouse=True)
    def report():
        yield
        log.print()
    return log, report


# --- data -------------------------------------------------------------------------------------

def pretrain_tiny_base(root, **train):
    """A float64 1-layer base pretrained for 2 steps under ``root / "base"`` on a corpus of
    Python source (``root / "corpus.txt"``); returns the corpus' DataSpec."""
    import inspect
    import json as json_module

    from lowrank.app import workflows as wf
    from lowrank.training.trainer import TrainConfig
    text = root / "corpus.txt"
    text.write_text(inspect.getsource(json_module.decoder) * 2)
    data = wf.DataSpec([str(text)], val_fraction=0.2)
    spec = wf.ModelSpec(vocab_size=300, context=16, n_layer=1, n_head=2, d_model=16)
    wf.pretrain(root / "base", spec, data, TrainConfig(**{"steps": 2, "batch_size": 4, **train}),
                dtype="float64", progress=False)
    return data


class FakeData:
    """A token source with TokenData's interface: uniform random ids, next-token targets."""

    def __init__(self, config):
        self.config = config
        self.context = config.context

    def batch(self, split, batch_size, rng):
        x = rng.integers(0, self.config.vocab_size, (batch_size, self.context))
        return x, np.roll(x, -1, axis=1)

    def eval_batches(self, split, batch_size, max_batches):
        rng = np.random.default_rng(99)
        for _ in range(max_batches):
            yield self.batch(split, batch_size, rng)
