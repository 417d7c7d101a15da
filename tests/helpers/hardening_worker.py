"""A loader process for the corrupted-directory battery (tests/hardening/test_files.py).

Started once, under an address-space cap (``resource.setrlimit(RLIMIT_AS)``, set by the
parent), it reads one JSON request per line — ``{"base": dir, "adapter": dir}`` — loads the
pair as ``lowrank eval`` would (base, tokenizer, adapter, training state) and answers one
JSON line: ``{"outcome": "loaded", "fingerprint": ...}``, ``{"outcome": "refused",
"message": ...}``, ``{"outcome": "memory"}`` or ``{"outcome": "traceback", "type": ...}``.
Other requests name a ``kind``: ``pretrained`` (a Hugging Face directory through
``lr.from_pretrained``), ``tokenizer`` (a tokenizer.json loaded and used on probe texts),
``tsv`` (a classification data file read and its labels built) and ``classifier`` (a
classifier directory's prediction). Every reply carries ``maxrss_mb``, the worker's peak
resident memory so far. The parent times every request: a reply that does not come is a hang.
"""
import hashlib
import json
import resource
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


PROBES = ["def f(x):\n    return x", "a" * 3000 + "b", " \t" * 500, "héllo wörld ☃ 🙂", ""]


def other_fingerprint(request) -> str:
    h = hashlib.sha256()
    kind, path = request["kind"], request["path"]
    if kind == "pretrained":
        import lowrank as lr
        from lowrank import backend
        model = lr.from_pretrained(path)
        for name, p in model.named_parameters():
            a = np.ascontiguousarray(backend.to_numpy(p.data))
            h.update(f"{name}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    elif kind == "tokenizer":
        from lowrank.text.tokenizer import Tokenizer
        tok = Tokenizer.load(path)
        for text in PROBES:
            ids = tok.encode(text)
            h.update(ids.tobytes())
            h.update(tok.decode(ids).encode("utf-8", "replace"))
        ids, mask = tok.encode_batch([t or "x" for t in PROBES], max_length=32)
        h.update(ids.tobytes() + mask.tobytes())
    elif kind == "tsv":
        from lowrank.tasks.data_files import read_examples
        from lowrank.tasks.text_data import label_names
        examples = read_examples(path, format="tsv")
        names = label_names(examples)
        h.update(json.dumps([len(examples), len(names), names[:50],
                             [(e.text[:50], e.label) for e in examples[:50]]]).encode())
    elif kind == "classifier":
        from lowrank.tasks.classify_io import predict
        h.update(json.dumps(predict(path, ["lovely", "awful"])).encode())
    else:
        raise KeyError(kind)
    return h.hexdigest()


def answer(request) -> dict:
    try:
        if "kind" in request:
            return {"outcome": "loaded", "fingerprint": other_fingerprint(request)}
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
        reply = answer(json.loads(line))
        reply["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
