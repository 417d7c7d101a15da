"""Injection, the training loop, resume, the CLI and the demo, end to end on small data."""
import json

import numpy as np
import pytest

import lowrank as lr
from lowrank.formats import checkpoint
from lowrank.app import cli, workflows as wf
from lowrank.nn.hooks import StepHook
from lowrank.models import GPT, GPTConfig
from lowrank.training.trainer import NonFiniteLossError, Trainer, TrainConfig

from tests.helpers.common import FakeData

TINY = GPTConfig(vocab_size=300, context=16, n_layer=2, n_head=2, d_model=16)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    import inspect
    import json as json_module
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(inspect.getsource(json_module.decoder) * 2)
    return path


def tiny_model(xp=None, dtype="float64"):
    return GPT(TINY, seed=0, dtype=dtype, xp=xp)


def test_inject_wraps_matching_linears_and_freezes_the_rest(xp):
    model = tiny_model(xp)
    idx = xp.asarray(np.arange(12).reshape(2, 6))
    before, _ = model.forward(idx)
    names = lr.adapters.inject(model, lr.adapters.config("lora", r=2), ["q", "attn.v"])
    assert names == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    trainable = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert trainable == [f"blocks.{i}.attn.{t}.{f}" for i in range(2) for t in "qv"
                         for f in ("lora_A", "lora_B")]
    after, _ = model.forward(idx)
    assert float(abs(after - before).max()) == 0.0     # kaiming init: B = 0
    # the base weight keeps its documented name (docs/models.md#parameter-names) inside the adapter
    assert "blocks.0.attn.q.weight" in dict(model.named_parameters())


def test_inject_regex_and_bias_all(xp):
    model = tiny_model(xp)
    names = lr.adapters.inject(model, lr.adapters.config("lora", r=2, bias="all"),
                               r"blocks\.1\.mlp\.fc[12]")
    assert names == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    trainable = {n for n, _ in model.named_parameters(trainable_only=True)}
    assert "blocks.0.attn.o.bias" in trainable and "ln_f.bias" in trainable
    assert "blocks.0.attn.o.weight" not in trainable


def test_inject_unmatched_target_lists_the_modules():
    with pytest.raises(ValueError, match=r"\['query'\] match no Linear.*blocks\.0\.attn\.q"):
        lr.adapters.inject(tiny_model(), lr.adapters.config("lora", r=2), ["q", "query"])


class RecordingHook(StepHook):
    def __init__(self):
        self.events = []

    def extra_loss(self, trainer):
        # gradients exist here: backward ran; the optimizer has not stepped yet
        grad = trainer.optimizer.params["blocks.0.attn.q.lora_B"].grad
        self.events.append(("extra_loss", trainer.optimizer.step_count, grad is not None))
        return 0.0

    def after_step(self, trainer):
        grad = trainer.optimizer.params["blocks.0.attn.q.lora_B"].grad
        self.events.append(("after_step", trainer.optimizer.step_count,
                            float(abs(grad).max()) > 0))


def test_trainer_order_backward_step_hooks_zero_grad():
    model = tiny_model()
    lr.adapters.inject(model, lr.adapters.config("lora", r=2), ["q"])
    hook = RecordingHook()
    trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=2, batch_size=2), hooks=[hook])
    trainer.fit(progress=False)
    assert hook.events == [("extra_loss", 0, True), ("after_step", 1, True),
                           ("extra_loss", 1, True), ("after_step", 2, True)]
    # zero-grad ran after the hooks; optimizer state exists only for trainable parameters
    assert float(abs(model.blocks[0].attn.q.lora_B.grad).max()) == 0.0
    assert set(trainer.optimizer.state) == {n for n, _ in model.named_parameters(trainable_only=True)}


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 accumulate to the gradient of the batch of 4 they form."""
    data = FakeData(TINY)
    rng = np.random.default_rng(3)
    x, y = data.batch("train", 4, rng)
    big, small = tiny_model(), tiny_model()
    loss, cache = big.loss(x, y)
    big.zero_grad()
    big.loss_backward(cache)
    small.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        _, cache = small.loss(x[half], y[half])
        small.loss_backward(cache, dloss=0.5)
    for (name, p), (_, q) in zip(big.named_parameters(), small.named_parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=1e-10, atol=1e-14, err_msg=name)


def _pretrain(out, steps, text_file, resume=False, save_every=0):
    spec = wf.ModelSpec(vocab_size=300, context=16, n_layer=1, n_head=2, d_model=16)
    train = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup=2, seed=0)
    return wf.pretrain(out, spec, wf.DataSpec([str(text_file)], val_fraction=0.2), train,
                       dtype="float64", resume=resume, save_every=save_every, progress=False)


def test_resume_continues_bit_identically(tmp_path, text_file):
    _pretrain(tmp_path / "straight", 6, text_file)
    _pretrain(tmp_path / "resumed", 3, text_file)
    result = _pretrain(tmp_path / "resumed", 6, text_file, resume=True)
    assert len(result.history) == 6
    a = checkpoint.load_model(tmp_path / "straight")
    b = checkpoint.load_model(tmp_path / "resumed")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(p.data, q.data), name


@pytest.mark.parametrize("shards", [1, 2])
def test_finetune_adapter_round_trip_and_resume(tmp_path, text_file, shards):
    """Resume is bit-identical, batch shards (their dropout streams spawned from the
    model's, which the checkpoint holds) included."""
    _pretrain(tmp_path / "base", 2, text_file)
    data = wf.DataSpec([str(text_file)], val_fraction=0.2)

    def run(out, steps, resume=False):
        return wf.finetune(out, tmp_path / "base", "lora", ["q", "fc1"], {"r": 2, "alpha": 4.0,
                           "dropout": 0.1}, data, TrainConfig(steps=steps, batch_size=4, lr=1e-2,
                                                              shards=shards),
                           resume=resume, progress=False)
    straight = run(tmp_path / "one", 4)
    run(tmp_path / "two", 2)
    run(tmp_path / "two", 4, resume=True)
    a, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "one")
    b, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "two")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(p.data, q.data), name
    for (name, p), (_, q) in zip(a.named_parameters(), straight.model.named_parameters()):
        assert np.array_equal(p.data, q.data), name
    info = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert info["config"]["r"] == 2 and info["targets"] == ["fc1", "q"]


def test_mismatched_adapter_names_key_and_shapes(tmp_path, text_file):
    _pretrain(tmp_path / "base", 1, text_file)
    data = wf.DataSpec([str(text_file)], val_fraction=0.2)
    wf.finetune(tmp_path / "r2", tmp_path / "base", "lora", ["q"], {"r": 2}, data,
                TrainConfig(steps=1, batch_size=2), progress=False)
    model, _, _ = wf.load_base(tmp_path / "base")
    lr.adapters.inject(model, lr.adapters.config("lora", r=3), ["q"])
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q\.lora_A.*\(2, 16\).*\(3, 16\)|"
                                         r"blocks\.0\.attn\.q\.lora_A.*\(3, 16\).*\(2, 16\)"):
        checkpoint.load_adapter(model, tmp_path / "r2")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, text_file, monkeypatch):
    _pretrain(tmp_path / "run", 2, text_file, save_every=1)
    saved = checkpoint.load_model(tmp_path / "run")
    original = GPT.loss

    def poisoned(self, idx, targets):
        loss, cache = original(self, idx, targets)
        return float("nan"), cache
    monkeypatch.setattr(GPT, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2"):
        _pretrain(tmp_path / "run", 4, text_file, resume=True, save_every=1)
    kept = checkpoint.load_model(tmp_path / "run")
    for (name, p), (_, q) in zip(saved.named_parameters(), kept.named_parameters()):
        assert np.array_equal(p.data, q.data), name
    assert checkpoint.load_training_state(tmp_path / "run")["step"] == 2


@pytest.mark.parametrize("command", ["pretrain", "finetune", "generate", "eval", "demo", "bench"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lowrank " + command in capsys.readouterr().out


def test_cli_pretrain_finetune_generate_eval(tmp_path, text_file, capsys):
    corpus = ["--corpus", str(text_file)]
    assert cli.main(["pretrain", "--out", str(tmp_path / "base"), "--steps", "2", "--vocab-size",
                     "300", "--context", "16", "--n-layer", "1", "--d-model", "16",
                     "--batch-size", "2", "--no-progress", *corpus]) == 0
    assert cli.main(["finetune", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "ft"),
                     "--variant", "lora", "--targets", "q,v", "--r", "2", "--alpha", "4",
                     "--steps", "2", "--batch-size", "2", "--shards", "2", "--no-progress",
                     *corpus]) == 0
    assert "lora: 128 trainable parameters" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(tmp_path / "base"), "--adapter",
                     str(tmp_path / "ft"), "--prompt", "def", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def")
    assert cli.main(["eval", "--model", str(tmp_path / "base"), "--batches", "2", *corpus]) == 0
    assert "validation loss" in capsys.readouterr().out
    # bad input is an error message and exit code 2, not a traceback
    assert cli.main(["finetune", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "x"),
                     "--targets", "nope", "--steps", "1", "--no-progress", *corpus]) == 2
    assert "match no Linear" in capsys.readouterr().err


def test_demo_runs_and_writes_table_and_plot(tmp_path, monkeypatch):
    from lowrank.app import demo
    monkeypatch.setattr(demo, "BASE", wf.ModelSpec(vocab_size=300, context=16, n_layer=1,
                                                   n_head=2, d_model=16))
    monkeypatch.setattr(demo, "CODE", wf.DataSpec("code", max_bytes=100_000))
    results = demo.run_demo(tmp_path, pretrain_steps=2, finetune_steps=2, progress=False)
    labels = [r["label"] for r in results]
    assert labels[:2] == ["base (no fine-tuning)", "full"]
    assert set(lr.adapters.available()) <= set(labels)
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert "| lora |" in (tmp_path / "results.md").read_text()
    # the second run reuses the cached base
    demo.run_demo(tmp_path, pretrain_steps=2, finetune_steps=1, progress=False)


def test_first_block_skips_its_input_gradient_yet_adapter_grads_are_exact(monkeypatch):
    """Frozen embeddings: block 0's q, k, v need no dx. Skipping it must not change a
    gradient: adapter grads in block 0 still match finite differences of the loss."""
    model = tiny_model()
    lr.adapters.inject(model, lr.adapters.config("lora", r=2), ["q", "k", "v"])
    rng = np.random.default_rng(0)
    for _, p in model.named_parameters(trainable_only=True):
        p.data += 0.1 * rng.standard_normal(p.shape)
    asked = []
    real = lr.adapters.LoraLinear.adapter_backward

    def spy(self, dy, cache, need_dx):
        asked.append(need_dx)
        return real(self, dy, cache, need_dx)
    monkeypatch.setattr(lr.adapters.LoraLinear, "adapter_backward", spy)
    x = rng.integers(0, TINY.vocab_size, (2, 6))
    y = rng.integers(0, TINY.vocab_size, (2, 6))
    model.zero_grad()
    _, cache = model.loss(x, y)
    model.loss_backward(cache)
    assert asked == [True] * 3 + [False] * 3          # block 1 needs dx, block 0 does not
    for name in ("blocks.0.attn.q.lora_A", "blocks.0.attn.v.lora_B"):
        p = dict(model.named_parameters())[name]
        for idx in [(0, 0), (1, 1)]:
            old = p.data[idx]
            p.data[idx] = old + 1e-6
            up = model.loss(x, y)[0]
            p.data[idx] = old - 1e-6
            down = model.loss(x, y)[0]
            p.data[idx] = old
            assert abs((up - down) / 2e-6 - p.grad[idx]) <= 1e-7 * max(1.0, abs(p.grad[idx]))


def test_public_save_and_load_round_trip(tmp_path):
    """docs/api.md#save-load: ``lr.save(model, path)`` / ``lr.load(path)``."""
    model = tiny_model()
    lr.save(model, tmp_path / "m")
    loaded = lr.load(tmp_path / "m")
    assert loaded.config == model.config
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert q.dtype == p.dtype and np.array_equal(p.data, q.data), name
