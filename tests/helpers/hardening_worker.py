"""A loader process for the corrupted-directory battery (tests/hardening/test_files.py).

Started once, under an address-space cap (``resource.setrlimit(RLIMIT_AS)``, set by the
parent), it reads one JSON request per line — ``{"base": dir, "adapter": dir}`` — loads the
pair as ``lowrank eval`` would (base, tokenizer, adapter, training state) and answers one
JSON line: ``{"outcome": "loaded", "fingerprint": ...}``, ``{"outcome": "refused",
"message": ...}``, ``{"outcome": "memory"}`` or ``{"outcome": "traceback", "type": ...}``.
The parent times every request: a reply that does not come is a hang.
"""
import hashlib
import json
import sys

import numpy as np


def fingerprint(base, adapter) -> str:
    from lowrank import backend
    from lowrank.formats import checkpoint
    from lowrank.app import workflows as wf
    h = hashlib.sha256()
    model, tok = wf.load_finetuned(base, adapter)
    for name, p in model.named_parameters():
        a = np.ascontiguousarray(backend.to_numpy(p.data))
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(np.asarray(tok.encode("def f(x):\n    return x"), dtype=np.int64).tobytes())
    state = checkpoint.load_training_state(adapter)
    h.update(_canonical(state).encode())
    return h.hexdigest()


def _canonical(obj) -> str:
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k}:{_canonical(obj[k])}" for k in sorted(obj)) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_canonical(v) for v in obj) + "]"
    if isinstance(obj, np.ndarray):
        return f"a{obj.dtype}{obj.shape}{hashlib.sha256(obj.tobytes()).hexdigest()}"
    return repr(obj)


def answer(request) -> dict:
    try:
        return {"outcome": "loaded", "fingerprint": fingerprint(request["base"],
                                                                request["adapter"])}
    except MemoryError:
        return {"outcome": "memory"}
    except (ValueError, FileNotFoundError) as exc:
        return {"outcome": "refused", "message": str(exc)}
    except Exception as exc:   # noqa: BLE001 - the battery counts these as tracebacks
        return {"outcome": "traceback", "type": type(exc).__name__, "message": str(exc)[:300]}


def main():
    for line in sys.stdin:
        print(json.dumps(answer(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
