"""Checkpoint I/O: safetensors + JSON, atomic writes, training state, adapters."""
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn

import lowrank.formats.checkpoint as ckpt
from lowrank.files import storage
from lowrank import adapters, backend
from lowrank.nn.layers import Linear
from lowrank.nn.module import Module, Parameter

from tests.helpers.common import to_host


@dataclass
class TinyConfig:
    d: int = 4
    vocab: int = 7

    def to_dict(self):
        return asdict(self)


class Block(Module):
    def __init__(self, d, seed, dtype, xp):
        self.ln = Parameter(backend.asarray(np.ones(d, dtype=dtype), xp=xp))
        self.fc = Linear(d, 2 * d, seed=seed, dtype=dtype, xp=xp)


class Tiny(Module):
    """A small stand-in for GPT: an embedding, a list of blocks, a frozen head."""

    def __init__(self, config=TinyConfig(), seed=0, dtype="float32", xp=None):
        self.config = config
        rng = backend.host_rng(seed)
        self.emb = Parameter(backend.host_normal(rng, (config.vocab, config.d), 0.02, dtype, xp))
        self.blocks = [Block(config.d, seed + 1 + i, dtype, xp) for i in range(2)]
        self.head = Linear(2 * config.d, config.vocab, bias=False, seed=seed + 9, dtype=dtype, xp=xp)
        self.head.weight.trainable = False


def _params(model):
    return {k: to_host(p.data) for k, p in model.named_parameters()}


def _raw(model):
    return {k: backend.to_numpy(p.data).copy() for k, p in model.named_parameters()}


# --- models -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_round_trip(tmp_path, xp, dtype):
    model = Tiny(seed=0, dtype=dtype, xp=xp)
    ckpt.save_model(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"] == {"d": 4, "vocab": 7} and cfg["dtype"] == dtype
    assert cfg["train_state"] is None
    on_disk = stn.load_file(str(tmp_path / "model.safetensors"))
    assert set(on_disk) == {k for k, _ in model.named_parameters()}
    assert "blocks.1.fc.weight" in on_disk and on_disk["blocks.1.fc.weight"].shape == (8, 4)

    other = Tiny(seed=123, dtype=dtype, xp=xp)
    before = _raw(model)
    assert not np.array_equal(_raw(other)["emb"], before["emb"])
    missing, unexpected = ckpt.load_weights(other, tmp_path)
    assert missing == [] and unexpected == []
    after = _raw(other)
    for k in before:
        assert after[k].dtype == np.dtype(dtype)
        assert after[k].tobytes() == before[k].tobytes(), k          # bit-identical
    for _, p in other.named_parameters():                            # stays on its backend
        assert backend.backend_of(p.data) == backend.backend_of(model.emb.data)
    assert other.head.weight.trainable is False                       # flags untouched
    # the loaded arrays are ordinary writable arrays (optimizers update them in place)
    other.emb.data *= 2.0


def test_load_casts_to_model_dtype(tmp_path):
    ckpt.save_model(Tiny(dtype="float64"), tmp_path)
    model = Tiny(seed=5, dtype="float32")
    ckpt.load_weights(model, tmp_path / "model.safetensors")
    assert model.emb.data.dtype == np.float32
    np.testing.assert_allclose(model.emb.data, Tiny(dtype="float64").emb.data, rtol=1e-6)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    ckpt.save_model(Tiny(TinyConfig(d=4)), tmp_path)
    model = Tiny(TinyConfig(d=4, vocab=9), seed=3)
    before = _raw(model)
    with pytest.raises(ValueError) as err:
        ckpt.load_weights(model, tmp_path)
    msg = str(err.value)
    assert "'emb'" in msg and "(7, 4)" in msg and "(9, 4)" in msg
    after = _raw(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)   # nothing assigned


def test_missing_and_unexpected_keys(tmp_path):
    model = Tiny()
    ckpt.save_model(model, tmp_path)
    bigger = Tiny()
    bigger.extra = Parameter(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"missing key 'extra'.*\(2, 3\)"):
        ckpt.load_weights(bigger, tmp_path)
    missing, unexpected = ckpt.load_weights(bigger, tmp_path, strict=False)
    assert missing == ["extra"] and unexpected == []

    smaller = Tiny()
    del smaller.head
    with pytest.raises(ValueError, match=r"unexpected key 'head.weight'.*\(7, 8\)"):
        ckpt.load_weights(smaller, tmp_path)
    missing, unexpected = ckpt.load_weights(smaller, tmp_path, strict=False)
    assert missing == [] and unexpected == ["head.weight"]


def _corrupt_cases(path: Path):
    data = path.read_bytes()
    yield "truncated", data[:-7]
    yield "truncated header", data[:20]
    yield "empty", b""
    yield "garbage", b"\x00" * 8 + b"not a safetensors file at all"
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF                      # a bit flip in the tensor bytes
    yield "bit flip", bytes(flipped)


def test_corrupt_file_raises_value_error_naming_file(tmp_path):
    src = tmp_path / "good"
    ckpt.save_model(Tiny(), src)
    good = (src / "model.safetensors").read_bytes()
    for label, payload in _corrupt_cases(src / "model.safetensors"):
        (src / "model.safetensors").write_bytes(payload)
        with pytest.raises(ValueError, match="model.safetensors") as err:
            ckpt.load_weights(Tiny(), src)
        assert "corrupt" in str(err.value), label
    (src / "model.safetensors").write_bytes(good)
    ckpt.load_weights(Tiny(), src)
    (src / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json"):
        ckpt.load_training_state(src)
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        ckpt.load_weights(Tiny(), tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/model.safetensors"):
        ckpt.load_weights(Tiny(), tmp_path / "empty")


# --- atomicity ----------------------------------------------------------------------------


class _Boom(RuntimeError):
    pass


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = Tiny(seed=0)
    ckpt.save_model(old, tmp_path)
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real_fdopen = os.fdopen

    class HalfWriter:
        """A file that writes half the bytes it is given, then fails (disk full, crash)."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            raise _Boom("simulated failure mid-write")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(_Boom):
        ckpt.save_model(Tiny(seed=99), tmp_path)
    monkeypatch.undo()

    files_after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert files_after == files_before                 # no torn file, no temp file left
    fresh = Tiny(seed=42)
    ckpt.load_weights(fresh, tmp_path)
    assert fresh.emb.data.tobytes() == old.emb.data.tobytes()


def test_failed_replace_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    ckpt.atomic_write(target, b"old")

    def fail(*args):
        raise _Boom("crash before rename")

    monkeypatch.setattr(storage.os, "replace", fail)
    with pytest.raises(_Boom):
        ckpt.atomic_write(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    ckpt.atomic_write(target, "new")
    assert target.read_text() == "new"


# --- training state -----------------------------------------------------------------------------


def _moments(model, xp, rng):
    out = {}
    for name, p in model.named_parameters(trainable_only=True):
        m = rng.standard_normal(p.shape).astype(p.dtype) * 1e-3
        v = rng.random(p.shape).astype(p.dtype) ** 8     # tiny values, bits must survive
        if m.size:
            m.flat[0] = np.finfo(p.dtype).tiny / 4       # a subnormal
        out[name] = {"step": 17, "exp_avg": backend.asarray(m, xp=xp),
                     "exp_avg_sq": backend.asarray(v, xp=xp)}
    return out


def _optimizer_state(model, xp, rng):
    """Laid out as ``AdamW.state_dict()``: per-parameter moments under "state"."""
    return {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
            "step_count": 17, "state": _moments(model, xp, rng)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_state_round_trip_is_bit_identical(tmp_path, xp, dtype):
    model = Tiny(dtype=dtype, xp=xp)
    opt = _optimizer_state(model, xp, np.random.default_rng(0))
    data_rng = np.random.default_rng(2024)
    data_rng.random(5)                                   # advance: a mid-run state
    rng_state = data_rng.bit_generator.state
    ckpt.save_model(model, tmp_path)
    ckpt.save_training_state(tmp_path, 17, opt, rng_state, extra={"best_val": 2.5})

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"] == {"d": 4, "vocab": 7}          # save_model's fields survive
    keys = set(stn.load_file(str(tmp_path / "optimizer.safetensors")))
    names = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert keys == {f"exp_avg.{n}" for n in names} | {f"exp_avg_sq.{n}" for n in names}
    assert "head.weight" not in {n for n in names}

    state = ckpt.load_training_state(tmp_path)
    assert state["step"] == 17 and state["extra"] == {"best_val": 2.5}
    o = state["optimizer"]
    assert o["lr"] == 3e-4 and o["betas"] == [0.9, 0.95] and o["step_count"] == 17
    assert set(o["state"]) == set(names)
    for n in names:
        assert o["state"][n]["step"] == 17
        for moment in ("exp_avg", "exp_avg_sq"):
            saved = backend.to_numpy(opt["state"][n][moment])
            got = o["state"][n][moment]
            assert isinstance(got, np.ndarray) and got.dtype == saved.dtype
            assert got.tobytes() == saved.tobytes()               # bit-identical
    resumed = np.random.Generator(np.random.PCG64())
    resumed.bit_generator.state = state["rng"]
    assert np.array_equal(resumed.random(10), data_rng.random(10))
    # the model weights are still loadable next to the training state
    ckpt.load_weights(Tiny(seed=3, dtype=dtype, xp=xp), tmp_path)


def test_save_model_with_train_state_and_stale_optimizer_file(tmp_path):
    model = Tiny()
    moments = _moments(model, np, np.random.default_rng(1))
    grouped = {"exp_avg": {n: m["exp_avg"] for n, m in moments.items()}}  # another layout
    ckpt.save_model(model, tmp_path, train_state={"step": 3, "optimizer": grouped,
                                                  "rng": {"seed": 1}, "extra": {"a": [1, 2]}})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train_state"]["step"] == 3
    assert cfg["train_state"]["optimizer"]["exp_avg"]["emb"] == {"__tensor__": "exp_avg.emb"}
    state = ckpt.load_training_state(tmp_path)
    assert state["step"] == 3 and state["rng"] == {"seed": 1} and state["extra"] == {"a": [1, 2]}
    assert state["optimizer"]["exp_avg"]["emb"].tobytes() == grouped["exp_avg"]["emb"].tobytes()
    assert "exp_avg.emb" in stn.load_file(str(tmp_path / "optimizer.safetensors"))
    ckpt.save_model(model, tmp_path)                     # no state now: the old one goes
    assert ckpt.load_training_state(tmp_path) is None
    assert not (tmp_path / "optimizer.safetensors").exists()


def test_adamw_resume_is_bit_identical(tmp_path, xp):
    from lowrank.nn import optim

    def run(model, opt, steps, seed):
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            opt.zero_grad()
            for _, p in model.named_parameters(trainable_only=True):
                p.accumulate(backend.asarray(rng.standard_normal(p.shape).astype(p.dtype), xp=xp))
            opt.step()

    model = Tiny(dtype="float32", xp=xp)
    opt = optim.AdamW(model.named_parameters(trainable_only=True), lr=1e-2)
    run(model, opt, 3, seed=0)
    ckpt.save_model(model, tmp_path)
    ckpt.save_training_state(tmp_path, 3, opt.state_dict(), {}, {})
    run(model, opt, 2, seed=1)

    resumed = Tiny(seed=77, dtype="float32", xp=xp)
    ckpt.load_weights(resumed, tmp_path)
    opt2 = optim.AdamW(resumed.named_parameters(trainable_only=True), lr=1e-2)
    opt2.load_state_dict(ckpt.load_training_state(tmp_path)["optimizer"])
    run(resumed, opt2, 2, seed=1)
    a, b = _raw(model), _raw(resumed)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_training_state_only_directory_and_bad_state(tmp_path):
    ckpt.save_training_state(tmp_path / "s", 0, {"exp_avg": {}}, {"x": 1})
    assert ckpt.load_training_state(tmp_path / "s") == {
        "step": 0, "optimizer": {"exp_avg": {}}, "rng": {"x": 1}, "extra": {}}
    with pytest.raises(ValueError, match="object"):
        ckpt.save_training_state(tmp_path / "t", 1, {"bad": object()}, {})
    with pytest.raises(ValueError, match="step"):
        ckpt.save_training_state(tmp_path / "t", 1.5, {}, {})
    with pytest.raises(ValueError, match="'a.b'"):
        ckpt.save_training_state(tmp_path / "t", 1, {"a": {"b": np.ones(2)}, "a.b": np.ones(2)}, {})


def test_load_model_rebuilds_gpt(tmp_path):
    from lowrank import models as model_mod
    cfg = model_mod.GPTConfig(vocab_size=31, context=8, n_layer=1, n_head=2, d_model=8)
    model = model_mod.GPT(cfg, dtype="float64")
    active = backend.get_backend()
    ckpt.save_model(model, tmp_path)
    loaded = ckpt.load_model(tmp_path)
    a, b = _raw(model), _raw(loaded)
    assert set(a) == set(b)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    idx = np.arange(16).reshape(2, 8) % 31
    la, _ = model.forward(backend.asarray(idx, dtype="int64", xp=backend.get_namespace(model.parameters()[0].data)))
    lb, _ = loaded.forward(backend.asarray(idx, dtype="int64", xp=backend.get_namespace(loaded.parameters()[0].data)))
    assert np.array_equal(to_host(la), to_host(lb))
    strict = ckpt.load_model(tmp_path, backend="numpy-strict")
    assert all(backend.backend_of(p.data) == "numpy-strict" for p in strict.parameters())
    assert all(backend.to_numpy(p.data).tobytes() == a[k].tobytes()
               for k, p in strict.named_parameters())
    assert backend.get_backend() == active


# --- adapters -----------------------------------------------------------------------------


class Attn(Module):
    """Base weights from ``base_seed`` (shared), adapters from ``adapter_seed``."""

    def __init__(self, d, cfg, base_seed, adapter_seed, xp, dtype):
        rng = np.random.default_rng(base_seed)

        def host(*shape):
            return backend.asarray(rng.standard_normal(shape).astype(dtype), xp=xp)

        self.q = adapters.AdaptedLinear(host(d, d), host(d), cfg, seed=adapter_seed)
        self.k = Linear(d, d, seed=base_seed, dtype=dtype, xp=xp)
        self.v = adapters.AdaptedLinear(host(d, d), None, cfg, seed=adapter_seed + 1)


class AdaptedNet(Module):
    def __init__(self, cfg, adapter_seed=0, xp=None, dtype="float32", d=6):
        self.config = TinyConfig(d=d)
        self.blocks = [Block(d, 0, dtype, xp)]
        self.blocks[0].attn = Attn(d, cfg, 10, adapter_seed, xp, dtype)


def _nudge(model, xp):
    rng = np.random.default_rng(7)
    for name, p in model.named_parameters(trainable_only=True):
        if "lora" in name:
            p.data = p.data + backend.asarray(rng.standard_normal(p.shape).astype(p.dtype), xp=xp)


def test_adapter_round_trip(tmp_path, xp):
    cfg = adapters.config("lora", r=2, alpha=4.0)
    src = AdaptedNet(cfg, adapter_seed=0, xp=xp)
    _nudge(src, xp)                                    # B != 0, so outputs differ from base
    ckpt.save_adapter(src, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_model.safetensors",
                                                    "adapter_config.json"}
    keys = set(stn.load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {f"blocks.0.attn.{m}.lora_{ab}.weight" for m in "qv" for ab in "AB"}
    info = json.loads((tmp_path / "adapter_config.json").read_text())
    assert info["config"] == cfg.to_dict() and info["targets"] == ["q", "v"]
    assert info["modules"]["blocks.0.attn.q"]["params"]["blocks.0.attn.q.lora_A.weight"] == [2, 6]
    assert ckpt.read_adapter_config(tmp_path) == info

    dst = AdaptedNet(cfg, adapter_seed=5, xp=xp)
    assert not np.array_equal(to_host(dst.blocks[0].attn.q.lora_A.data),
                              to_host(src.blocks[0].attn.q.lora_A.data))
    ckpt.load_adapter(dst, tmp_path)
    a, b = _raw(src), _raw(dst)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    x = backend.asarray(np.random.default_rng(0).standard_normal((3, 6)).astype("float32"), xp=xp)
    for m in ("q", "v"):
        ya, _ = getattr(src.blocks[0].attn, m).forward(x)
        yb, _ = getattr(dst.blocks[0].attn, m).forward(x)
        assert to_host(ya).tobytes() == to_host(yb).tobytes()


def test_adapter_with_trained_bias_and_direct_layer(tmp_path):
    cfg = adapters.config("lora", r=2, alpha=4.0, bias="lora_only")
    layer = adapters.AdaptedLinear(np.ones((3, 4), np.float32), np.zeros(3, np.float32), cfg)
    layer.bias.data = layer.bias.data + 1.5
    ckpt.save_adapter(layer, tmp_path)
    keys = set(stn.load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {"lora_A.weight", "lora_B.weight", "bias"}
    other = adapters.AdaptedLinear(np.ones((3, 4), np.float32), np.zeros(3, np.float32), cfg,
                                   seed=1)
    ckpt.load_adapter(other, tmp_path)
    assert np.array_equal(other.bias.data, np.full(3, 1.5, np.float32))
    assert np.array_equal(other.lora_A.data, layer.lora_A.data)


def test_adapter_errors(tmp_path):
    cfg = adapters.config("lora", r=2, alpha=4.0)
    ckpt.save_adapter(AdaptedNet(cfg), tmp_path)
    wrong_rank = AdaptedNet(adapters.config("lora", r=3, alpha=4.0))
    with pytest.raises(ValueError) as err:
        ckpt.load_adapter(wrong_rank, tmp_path)
    msg = str(err.value)
    assert "blocks.0.attn.q.lora_A.weight" in msg and "(2, 6)" in msg and "(3, 6)" in msg

    merged = AdaptedNet(cfg)
    merged.blocks[0].attn.q.merge()
    with pytest.raises(ValueError, match="merged"):
        ckpt.load_adapter(merged, tmp_path)
    with pytest.raises(ValueError, match="no adapter"):
        ckpt.save_adapter(Tiny(), tmp_path / "x")
    with pytest.raises(ValueError, match="no adapter"):
        ckpt.load_adapter(Tiny(), tmp_path)

    only_q = AdaptedNet(cfg)
    only_q.blocks[0].attn.v = Linear(6, 6)
    with pytest.raises(ValueError, match=r"unexpected key 'blocks.0.attn.v.lora_A.weight'.*\(2, 6\)"):
        ckpt.load_adapter(only_q, tmp_path)

    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        ckpt.load_adapter(AdaptedNet(cfg), tmp_path)


@pytest.mark.parametrize("cut", range(6))
def test_a_save_cut_at_any_rename_leaves_one_whole_save(tmp_path, monkeypatch, cut):
    """A save is several renames; killed before rename ``cut``, the directory must still load
    as one whole save — the old one or the new one, weights and step together — and the next
    save must leave only the canonical files."""
    state = {"step": 1, "optimizer": {"state": {}}, "rng": {}, "extra": {"w": np.ones(3)}}
    old_model = Tiny(seed=1)
    ckpt.save_model(old_model, tmp_path, train_state=state)
    real_replace = storage.os.replace
    calls = []

    def killed_at_cut(src, dst):
        if len(calls) == cut:
            raise OSError("killed mid-save")
        calls.append(dst)
        real_replace(src, dst)
    monkeypatch.setattr(storage.os, "replace", killed_at_cut)
    new_model = Tiny(seed=2)
    try:
        ckpt.save_model(new_model, tmp_path, train_state={**state, "step": 2})
        finished = True
    except OSError:
        finished = False
    monkeypatch.undo()
    loaded = Tiny(seed=3)
    ckpt.load_weights(loaded, tmp_path)
    step = ckpt.load_training_state(tmp_path)["step"]
    expected = new_model if step == 2 else old_model
    for (name, p), (_, q) in zip(expected.named_parameters(), loaded.named_parameters()):
        assert np.array_equal(p.data, q.data), (cut, step, name)
    assert finished == (cut >= 5) and (step == 2) == (cut >= 3)   # 3rd rename: the commit
    ckpt.save_model(new_model, tmp_path, train_state=state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors"]
