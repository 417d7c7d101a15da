"""Small helpers shared by tests (host-side comparisons, finite-difference plumbing)."""
import numpy as np

from lowrank import backend


def to_host(a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a), dtype=np.float64)


def rel_err(a, b) -> float:
    """‖a − b‖ / max(‖a‖, ‖b‖, tiny), on host float64."""
    a, b = to_host(a), to_host(b)
    scale = max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)
    return float(np.linalg.norm(a - b) / scale)


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


def layer_fd_gradient(layer, array, x, G, mask=None, eps: float = 1e-6) -> np.ndarray:
    """Central differences of ``L = Σ layer.forward(x)·G`` with respect to every entry of
    ``array`` (perturbed in place and restored; any backend), as a host float64 array."""
    numeric = np.zeros(array.shape)
    for idx in np.ndindex(*array.shape):
        old = float(array[idx])
        array[idx] = old + eps
        up = float((layer.forward(x, dropout_mask=mask)[0] * G).sum())
        array[idx] = old - eps
        down = float((layer.forward(x, dropout_mask=mask)[0] * G).sum())
        array[idx] = old
        numeric[idx] = (up - down) / (2 * eps)
    return numeric
