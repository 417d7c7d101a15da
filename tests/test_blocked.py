"""The CPU kernel layer (docs/performance.md#blocked-kernels): ops whose chains run block by
block over rows give exactly the bits of the same chain on the whole array (the reference),
for sizes that split into several blocks, a ragged last block, and one block."""
import numpy as np
import pytest

from lowrank import backend
from lowrank.backend import blocked
from lowrank.ops import gelu

CHAINS = [  # (blocked op, reference chain, number of inputs)
    (lambda x: gelu.gelu_forward(x)[0], lambda x: gelu.tanh_chain(x)[0], 1),
    (lambda x: gelu.gelu_forward(x)[1][1], lambda x: gelu.tanh_chain(x)[1], 1),
    (lambda x: gelu.gelu_erf_forward(x)[0], lambda x: gelu.erf_chain(x)[0], 1),
    (lambda x: gelu.gelu_erf_forward(x)[1][1], lambda x: gelu.erf_chain(x)[1], 1),
    (lambda dy, x, p: gelu.gelu_backward(dy, (x, p)), gelu.tanh_backward_chain, 3),
    (lambda dy, x, p: gelu.gelu_erf_backward(dy, (x, p)), gelu.erf_backward_chain, 3),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [1, 700, 1031])
@pytest.mark.parametrize("case", range(len(CHAINS)))
def test_blocked_chains_equal_the_whole_array_reference(case, rows, dtype):
    op, reference, n_inputs = CHAINS[case]
    rng = np.random.default_rng(case)
    arrays = [(3 * rng.standard_normal((rows, 300))).astype(dtype) for _ in range(n_inputs)]
    got, want = op(*arrays), reference(*arrays)
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, want)


def test_large_arrays_really_are_split(monkeypatch):
    calls = []

    def chain(x, out=None):
        calls.append(x.shape[0])
        return gelu.tanh_chain(x, out)
    x = np.ones((1000, 256), dtype=np.float32)            # 1 KiB rows: 256 per block
    blocked.map_rows(chain, x, outputs=2)
    assert calls == [256, 256, 256, 232]
    calls.clear()
    blocked.map_rows(chain, x[:300], outputs=2)            # under two blocks: one call
    assert calls == [300]


def test_non_numpy_arrays_take_the_reference_path():
    host = np.linspace(-3, 3, 256000, dtype=np.float32).reshape(1000, 256)
    y, p = gelu.gelu_forward(backend.asarray(host, xp=backend.strict_numpy))
    assert backend.backend_of(y) == "numpy-strict"
    np.testing.assert_array_equal(backend.to_numpy(y), gelu.tanh_chain(host)[0])
