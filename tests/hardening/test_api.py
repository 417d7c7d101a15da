"""Generated API calls: every registered variant built from generated (often nonsensical) config
values, seeds, weights, inputs and output gradients. Each case is refused with a ValueError
naming the field or shape, or runs with finite outputs and gradients — never a traceback, a
hang (time cap per case) or a NaN from finite inputs and a valid config. Counts:
tests/helpers/hardening.py."""
import dataclasses

import numpy as np
from hypothesis import given, settings, strategies as st

import lowrank as lr
from lowrank.nn.decompose import svd_split
from lowrank.training.trainer import TrainConfig

from tests.helpers.hardening import CaseTimeout, examples, record, time_cap

NASTY = st.sampled_from([None, "x", -1, 0, 1, 2, 3, 1.5, True, float("inf"), float("nan"),
                         1e39, 1e6, 1e-30, [], {}, "none", 2**70])


@st.composite
def cases(draw):
    """A variant with valid fields (defaults, varied r, alpha, dropout), then at most one
    thing spoiled: a field, the seed or dy's shape."""
    variant = draw(st.sampled_from(lr.adapters.available()))
    names = [f.name for f in dataclasses.fields(lr.adapters.config(variant))]
    fields = {"r": draw(st.integers(1, 4)),
              "alpha": draw(st.floats(1e-3, 1e6)),
              "dropout": draw(st.sampled_from([0.0, 0.1, 0.5]))}
    spoil = draw(st.sampled_from([None, None, "seed", "dy", *names]))
    if spoil in names:
        fields[spoil] = draw(NASTY)
    m, n = draw(st.integers(4, 10)), draw(st.integers(4, 10))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    W = (scale * rng.standard_normal((m, n))).astype(dtype)
    x = (scale * rng.standard_normal((2, 3, n))).astype(dtype)
    dy_shape = draw(st.sampled_from([(2, 3, m + 1), (3, m), (2, 3, n + 1)])) \
        if spoil == "dy" else (2, 3, m)
    seed = draw(NASTY) if spoil == "seed" else draw(st.integers(0, 2**31))
    return variant, fields, W, x, rng.standard_normal(dy_shape).astype(dtype), seed


def _finite(*arrays) -> bool:
    return all(np.isfinite(np.asarray(a)).all() for a in arrays if a is not None)


def _run_case(variant, fields, W, x, dy, seed):
    cfg = lr.adapters.config(variant, **fields)
    layer = lr.adapters.AdaptedLinear(W, None, cfg, seed=seed)
    y, cache = layer.forward(x)
    if not _finite(y):
        return "nan", f"forward output of {variant} {fields}"
    dx = layer.backward(dy, cache)
    grads = [p.grad for p in layer.parameters(trainable_only=True)]
    if not _finite(dx, *grads):
        return "nan", f"gradients of {variant} {fields}"
    return "ok", ""


@settings(max_examples=examples(200))
@given(case=cases())
def test_generated_adapter_calls_are_refused_by_name_or_finite(case):
    variant, fields, W, x, dy, seed = case
    names = [*fields, "seed", "shape", "rank", "r "]
    try:
        with time_cap(), np.errstate(all="ignore"):
            outcome, detail = _run_case(variant, fields, W, x, dy, seed)
    except CaseTimeout as exc:
        outcome, detail = "hang", str(exc)
    except ValueError as exc:
        text = str(exc)
        outcome = "refused" if any(name in text for name in names) else "unnamed"
        detail = text
    except Exception as exc:  # noqa: BLE001 - counted: the battery asserts there are none
        outcome, detail = "traceback", f"{type(exc).__name__}: {exc}"
    record("api", outcome, f"{variant} {fields} seed={seed!r} dy={dy.shape}: {detail}")


TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


@settings(max_examples=examples(60))
@given(fields=st.fixed_dictionaries({}, optional={name: NASTY for name in TRAIN_FIELDS}),
       oversample=NASTY, n_iter=NASTY)
def test_generated_train_configs_and_svd_options_are_refused_by_name(fields, oversample,
                                                                      n_iter):
    for name, call in (("train", lambda: TrainConfig(**fields)),
                       ("svd", lambda: svd_split(np.eye(6), 2, "randomized",
                                                 oversample=oversample, n_iter=n_iter))):
        given_names = list(fields) if name == "train" else ["oversample", "n_iter"]
        try:
            with time_cap():
                call()
            outcome, detail = "ok", ""
        except CaseTimeout as exc:
            outcome, detail = "hang", str(exc)
        except ValueError as exc:
            outcome = "refused" if any(n in str(exc) for n in given_names) else "unnamed"
            detail = str(exc)
        except Exception as exc:  # noqa: BLE001
            outcome, detail = "traceback", f"{type(exc).__name__}: {exc}"
        record("api", outcome, f"{name} {fields} {oversample!r} {n_iter!r}: {detail}")


def test_alpha_that_cannot_work_is_refused_by_name():
    for alpha in (float("inf"), float("nan"), 1e39, None, "16", -1.0, 0.0):
        try:
            lr.adapters.config("lora", alpha=alpha)
        except ValueError as exc:
            assert str(exc).startswith("alpha"), exc
        else:
            raise AssertionError(f"alpha={alpha!r} accepted")


def test_wrong_dy_shape_names_both_shapes():
    layer = lr.adapters.AdaptedLinear(np.ones((4, 3)), None, lr.adapters.config("lora", r=2))
    _, cache = layer.forward(np.ones((2, 3)))
    try:
        layer.backward(np.ones((2, 5)), cache)
    except ValueError as exc:
        assert "(2, 5)" in str(exc) and "4" in str(exc), exc
    else:
        raise AssertionError("a wrong dy shape was accepted")
