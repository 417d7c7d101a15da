"""Corrupted checkpoint directories: every generated corruption of a saved base + adapter pair
is refused with one line naming the file, or loads exactly what was saved — never a traceback,
a hang (each case under a time cap), a memory blow-up (the loads run in a process under an
address-space cap), or a silent wrong load. Counts per outcome: tests/helpers/hardening.py."""
import json
import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowrank.files.untrusted import DTYPE_CODES, _digest

from tests.helpers.hardening import Worker, examples, make_runs, record, record_peak

NASTY = [[], {}, "(", "(.|.|.|.|.)*Z", 10**12, -1, 1e308, None, True, "x", [1, 2],
         {"__tensor__": "nope"}, float("nan"), "a" * 300]
DEEP = {f"__deep_{d}__": d for d in (70, 3000)}   # nesting past the cap, past Python's stack
NASTY += list(DEEP)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base, ft, _ = make_runs(tmp_path_factory.mktemp("runs"))
    worker = Worker()
    reference = worker.ask({"base": str(base), "adapter": str(ft)}, seconds=120)
    assert reference["outcome"] == "loaded", reference
    yield base, ft, worker, reference["fingerprint"]
    worker.stop()


def _walk(obj, choices):
    """A key path into ``obj`` picked by ``choices``."""
    path = []
    for c in choices:
        keys = sorted(obj) if isinstance(obj, dict) else list(range(len(obj))) \
            if isinstance(obj, list) else []
        if not keys:
            break
        key = keys[c % len(keys)]
        path.append(key)
        obj = obj[key]
    return path


def _json_set(path, choices, value, reseal, delete):
    obj = json.loads(path.read_text())
    keys = _walk(obj, choices)
    if not keys:
        obj = value
    else:
        parent = obj
        for k in keys[:-1]:
            parent = parent[k]
        if delete and isinstance(parent, dict):
            del parent[keys[-1]]
        else:
            parent[keys[-1]] = value
    if reseal and isinstance(obj, dict):   # as a careful forger would: loaders must cope
        record = obj.get("integrity")
        files = record.get("files") if isinstance(record, dict) else None
        obj["integrity"] = {"files": files} if isinstance(files, dict) else {}
        obj["integrity"]["sha256"] = _digest(obj)
    text = json.dumps(obj, allow_nan=True)
    for marker, depth in DEEP.items():
        text = text.replace(json.dumps(marker), "[" * depth + "]" * depth)
    path.write_text(text)


def _st_rewrite(path, kind, pick):
    """Rewrite a safetensors file's tensors (a dtype cast, two swapped, a shape that lies),
    with the file's own checksum recomputed."""
    from lowrank.files import storage
    tensors, meta = storage.read_safetensors_with_metadata(path)
    keys = sorted(tensors)
    if kind == "cast":
        k = keys[pick % len(keys)]
        tensors[k] = tensors[k].astype(np.float64 if tensors[k].dtype == np.float32
                                       else np.float32)
    elif kind == "swap" and len(keys) > 1:
        a, b = keys[pick % len(keys)], keys[(pick + 1) % len(keys)]
        tensors[a], tensors[b] = tensors[b], tensors[a]
    elif kind == "rename":
        k = keys[pick % len(keys)]
        tensors[k + "x"] = tensors.pop(k)
    meta = {k: v for k, v in meta.items() if k not in ("format", storage.CHECKSUM_KEY)}
    path.write_bytes(storage.safetensors_bytes(tensors, meta))
    if kind == "huge_shape":   # the header claims 2^40 floats and the file is (sparse) that big
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        k = sorted(k for k in header if k != "__metadata__")[pick % len(keys)]
        begin = header[k]["data_offsets"][0]
        header[k] = {"dtype": DTYPE_CODES["<f4"], "shape": [1 << 38],
                     "data_offsets": [begin, begin + (4 << 38)]}
        blob = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob)
        os.truncate(path, 8 + len(blob) + begin + (4 << 38))


def corrupt(path, op):
    kind = op[0]
    if kind == "flip":
        data = bytearray(path.read_bytes())
        if data:
            data[int(op[1] * (len(data) - 1))] ^= op[2]
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        os.truncate(path, int(op[1] * path.stat().st_size))
    elif kind == "append":
        with open(path, "ab") as fh:
            fh.write(op[1])
    elif kind == "sparse_tail":
        os.truncate(path, path.stat().st_size + (64 << 30))
    elif kind in ("delete", "fifo", "devzero", "dir"):
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "devzero":
            os.symlink("/dev/zero", path)
        elif kind == "dir":
            path.mkdir()
    elif kind == "json":
        _json_set(path, *op[1:])
    elif kind == "tensors":
        _st_rewrite(path, *op[1:])


def _ops(name):
    common = [st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
              st.tuples(st.just("truncate"), st.floats(0, 0.999)),
              st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
              st.tuples(st.sampled_from(["sparse_tail", "delete", "fifo", "devzero", "dir"]))]
    if name.endswith(".json") and name != "tokenizer.json":
        common.append(st.tuples(st.just("json"), st.lists(st.integers(0, 50), max_size=6),
                                st.sampled_from(NASTY), st.booleans(), st.booleans()))
    if name.endswith(".safetensors"):
        common.append(st.tuples(st.just("tensors"),
                                st.sampled_from(["cast", "swap", "rename", "huge_shape"]),
                                st.integers(0, 50)))
    return st.one_of(common)


FILES = [("base", n) for n in ("config.json", "model.safetensors", "tokenizer.json",
                               "run.json", "optimizer.safetensors")] + \
        [("ft", n) for n in ("adapter_config.json", "adapter_model.safetensors", "run.json",
                             "optimizer.safetensors", "tokenizer.json")]


@settings(max_examples=examples(150))
@given(data=st.data())
def test_corrupted_directory_is_refused_or_loads_what_was_saved(runs, tmp_path_factory, data):
    base, ft, worker, reference = runs
    where, name = data.draw(st.sampled_from(FILES), label="file")
    op = data.draw(_ops(name), label="corruption")
    root = tmp_path_factory.mktemp("case")
    dirs = {"base": root / "base", "ft": root / "ft"}
    shutil.copytree(base, dirs["base"])
    shutil.copytree(ft, dirs["ft"])
    corrupt(dirs[where] / name, op)
    reply = worker.ask({"base": str(dirs["base"]), "adapter": str(dirs["ft"])})
    record_peak("files", reply)
    forged = op[0] == "json" and op[3]     # re-sealed by hand: an input the loader must bear
    outcome = reply["outcome"]
    detail = f"{where}/{name} {op!r}: {reply}"
    if outcome == "loaded":
        same = reply["fingerprint"] == reference
        outcome = "identical" if same else "forged-loaded" if forged else "wrong"
    elif outcome == "refused":
        message = reply["message"]
        outcome = "multiline" if "\n" in message else \
            "refused" if str(root) in message else "unnamed"
    record("files", outcome, detail)
    shutil.rmtree(root, ignore_errors=True)


KINDS = [("flip", 0.5, 1), ("flip", 0.0, 255), ("truncate", 0.5), ("truncate", 0.0),
         ("append", b"\x00junk"), ("sparse_tail",), ("delete",), ("fifo",), ("devzero",),
         ("dir",)]
JSON_KINDS = [("json", [], [], True, False), ("json", [0], [], False, False),
              ("json", [], "__deep_3000__", False, False)] + \
    [("json", path, value, True, False) for path in ([1], [2], [3], [4], [5], [6], [7], [0, 0])
     for value in ("(.|.|.|.|.)*Z", 10**12, None, "__deep_70__")]
TENSOR_KINDS = [("tensors", kind, 0) for kind in ("cast", "swap", "rename", "huge_shape")]


@pytest.mark.parametrize("where,name", FILES)
def test_every_kind_of_corruption_of_every_file(runs, tmp_path, where, name):
    """The same outcomes for a fixed list: each kind of damage once on each file."""
    base, ft, worker, reference = runs
    kinds = KINDS + (JSON_KINDS if name.endswith(".json") and name != "tokenizer.json" else []) \
        + (TENSOR_KINDS if name.endswith(".safetensors") else [])
    for i, op in enumerate(kinds):
        root = tmp_path / str(i)
        dirs = {"base": root / "base", "ft": root / "ft"}
        shutil.copytree(base, dirs["base"])
        shutil.copytree(ft, dirs["ft"])
        corrupt(dirs[where] / name, op)
        reply = worker.ask({"base": str(dirs["base"]), "adapter": str(dirs["ft"])})
        record_peak("files-fixed", reply)
        outcome = reply["outcome"]
        if outcome == "loaded":
            outcome = "identical" if reply["fingerprint"] == reference else \
                "forged-loaded" if op[0] == "json" and op[3] else "wrong"
        elif outcome == "refused":
            outcome = "multiline" if "\n" in reply["message"] else \
                "refused" if str(root) in reply["message"] else "unnamed"
        record("files-fixed", outcome, f"{where}/{name} {op!r}: {reply}")
        shutil.rmtree(root, ignore_errors=True)
