"""Shared fixtures: the ``xp`` backend fixture and Hypothesis profiles.

Every backend test takes the ``xp`` fixture (an array namespace) or ``backend_name`` (its name),
both parametrised over ``numpy``, ``numpy-strict`` (which fails wherever CuPy would) and ``cupy``.
``LOWRANK_TEST_BACKENDS=cupy`` (or any comma list) narrows the set. ``BACKEND_NAMES`` lists
the backends that can run here, for an explicit ``parametrize``.

Without a usable GPU/CuPy the cupy cases are not dropped silently: each test module keeps one
cupy case, reported as a skip line that says how many cupy cases that module has, and the
others are deselected (pytest's summary counts them). One line per module instead of one per
case keeps a CPU run's report readable (a few hundred identical skips would bury real ones)
while still showing, module by module, that the GPU path did not run.
"""
import os
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from lowrank import backend

settings.register_profile(
    "ci", max_examples=40, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.register_profile(
    "dev", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NO_CUPY = "cupy: no GPU/CuPy available"


def _backends():
    wanted = os.environ.get("LOWRANK_TEST_BACKENDS")
    if wanted:
        return [b.strip() for b in wanted.split(",") if b.strip()]
    return ["numpy", "numpy-strict", "cupy"]


REQUESTED = _backends()
CUPY_OK = "cupy" in REQUESTED and backend.cupy_available()
BACKEND_NAMES = [name for name in REQUESTED if name != "cupy" or CUPY_OK]
FIXTURES = ("xp", "backend_name")


def _runnable(name: str) -> str:
    if name == "cupy" and not CUPY_OK:
        pytest.skip(NO_CUPY)
    return name


@pytest.fixture(params=REQUESTED, scope="session")
def xp(request):
    """The array namespace of one backend (``numpy``, the strict stand-in, or ``cupy``)."""
    return backend.namespace(_runnable(request.param))


@pytest.fixture(params=REQUESTED, scope="session")
def backend_name(request):
    """The name of one backend, for APIs that take a name (``backend="cupy"``)."""
    return _runnable(request.param)


def _backend_of(item):
    callspec = getattr(item, "callspec", None)
    params = {} if callspec is None else callspec.params
    return next((params[f] for f in FIXTURES if f in params), None)


def pytest_collection_modifyitems(config, items):
    """Without CuPy: one visible skip per module for its cupy cases, the rest deselected."""
    if CUPY_OK:
        return
    per_module = defaultdict(list)
    for item in items:
        if _backend_of(item) == "cupy":
            per_module[item.nodeid.split("::")[0]].append(item)
    if not per_module:
        return
    deselected = []
    for module, cases in per_module.items():
        first, rest = cases[0], cases[1:]
        first.add_marker(pytest.mark.skip(
            reason=f"{NO_CUPY} ({len(cases)} cupy case(s) in {module} not run)"))
        deselected.extend(rest)
    if deselected:
        dropped = set(map(id, deselected))
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if id(item) not in dropped]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
