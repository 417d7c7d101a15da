"""Shared fixtures: the ``xp`` backend fixture and Hypothesis profiles.

Every backend test runs under ``numpy`` and ``numpy-strict`` (which fails wherever CuPy
would), and under ``cupy`` when a GPU answers. ``LOWRANK_TEST_BACKENDS=cupy`` narrows the set.
"""
import os

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


def _backends():
    wanted = os.environ.get("LOWRANK_TEST_BACKENDS")
    if wanted:
        return [b.strip() for b in wanted.split(",") if b.strip()]
    names = ["numpy", "numpy-strict"]
    if backend.cupy_available():
        names.append("cupy")
    return names


BACKEND_NAMES = _backends()


@pytest.fixture(params=BACKEND_NAMES, scope="session")
def xp(request):
    """The array namespace of one backend (``numpy``, the strict stand-in, or ``cupy``)."""
    return backend.namespace(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
