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
