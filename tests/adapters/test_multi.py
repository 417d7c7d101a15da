"""Many adapters over one frozen base (lowrank.multi): trained together, each adapter
ends exactly where it ends alone; the fast path really shares the base matmul; DoRA (the
fallback) agrees too; views save/load like single-adapter models; the CLI writes one
loadable directory per adapter."""
import json

import numpy as np
import pytest

from lowrank.formats import checkpoint
from lowrank.app import workflows as wf
from lowrank.adapters import adapted_modules, config, inject
from lowrank.text.corpus import TokenData
from lowrank.models import GPT, GPTConfig
from lowrank.multi import modules as multi
from lowrank.app.multi_run import MultiTrainer, parse_variants, subdir_names
from lowrank.multi import (AdapterView, inject_multi, multi_loss, multi_loss_backward,
                           multi_modules)
from lowrank.training.trainer import Trainer, TrainConfig

from tests.helpers.common import rel_err

CFG = GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16)
TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
STEPS = 6


def token_data():
    ids = np.random.default_rng(7).integers(0, CFG.vocab_size, 4000)
    return TokenData(ids, CFG.context, val_fraction=0.1)


def base_model(xp=None):
    return GPT(CFG, seed=3, dtype="float64", xp=xp)


# (adapter config, TrainConfig overrides): different ranks, lr, batch sizes, accumulation,
# dropout, schedules and hooks (AdaLoRA's allocator + regulariser, SoRA's gate step)
RUNS = [
    (dict(variant="lora", r=2, alpha=4.0), dict(lr=1e-2, batch_size=4)),
    (dict(variant="lora", r=4, alpha=8.0, dropout=0.1, rslora=True),
     dict(lr=3e-3, batch_size=2, accum_steps=2, weight_decay=0.01)),
    (dict(variant="adalora", r=4, target_r=2, tinit=1, tfinal=1, alpha=4.0),
     dict(lr=5e-3, batch_size=3)),
    (dict(variant="sora", r=3, alpha=6.0, sparse_lambda=1e-2), dict(lr=4e-3, batch_size=4)),
]


def train_configs(runs, seed=10):
    return [TrainConfig(steps=STEPS, warmup=2, min_lr=1e-4, seed=seed + k, eval_batches=2,
                        **over) for k, (_, over) in enumerate(runs)]


def adapter_configs(runs):
    return [config(c["variant"], **{k: v for k, v in c.items() if k != "variant"})
            for c, _ in runs]


def alone(cfg, tc, data, xp=None):
    model = base_model(xp)
    inject(model, cfg, TARGETS, seed=tc.seed)
    Trainer(model, data, tc).fit(progress=False)
    return model


def together(cfgs, tcs, data, xp=None):
    model = base_model(xp)
    inject_multi(model, [(c, TARGETS, tc.seed) for c, tc in zip(cfgs, tcs)])
    trainer = MultiTrainer(model, [(data, tc) for tc in tcs])
    trainer.fit(progress=False)
    return model, trainer


def assert_same_adapters(views, models, tol=1e-10):
    worst = 0.0
    for view, model in zip(views, models):
        mine, ref = dict(view.named_parameters()), dict(model.named_parameters())
        names = [n for n, p in mine.items() if p.trainable]
        assert names and all(ref[n].trainable for n in names)
        for n in names:
            err = rel_err(mine[n].data, ref[n].data)
            worst = max(worst, err)
            assert err <= tol, (n, err)
    return worst


def test_trained_together_equals_trained_alone(xp):
    data = token_data()
    cfgs, tcs = adapter_configs(RUNS), train_configs(RUNS)
    model, trainer = together(cfgs, tcs, data, xp)
    refs = [alone(c, tc, data, xp) for c, tc in zip(adapter_configs(RUNS), tcs)]
    worst = assert_same_adapters(trainer.views, refs)
    print(f"together vs alone: max relative difference {worst:.2e}")
    # the schedules and hooks really acted: AdaLoRA masked triplets, SoRA moved its gates
    ada = [m for _, m in adapted_modules(trainer.views[2])]
    assert sum(m.realised_rank for m in ada) < sum(m.r for m in ada)
    assert all(tr.step == STEPS for tr in trainer.trainers)
    # the shared base is untouched and every fast-path layer still shares it
    ref_base = base_model(xp)
    for name, m in multi_modules(model):
        assert rel_err(m.weight.data, dict(ref_base.named_parameters())[name + ".weight"].data) == 0
        assert all(m.shares_base(k) for k in m.adapters)


def test_dora_and_pissa_fallback_trained_together_equal_alone(xp):
    runs = [(dict(variant="dora", r=2, alpha=4.0), dict(lr=1e-2, batch_size=3)),
            (dict(variant="lora", r=2, alpha=4.0), dict(lr=5e-3, batch_size=2)),
            (dict(variant="lora", r=2, alpha=4.0, init="pissa"), dict(lr=5e-3, batch_size=2))]
    data = token_data()
    cfgs, tcs = adapter_configs(runs), train_configs(runs, seed=20)
    model, trainer = together(cfgs, tcs, data, xp)
    for _, m in multi_modules(model):   # DoRA, PiSSA: their own path; LoRA: the shared one
        assert [m.shares_base(k) for k in range(3)] == [False, True, False]
    refs = [alone(c, tc, data, xp) for c, tc in zip(adapter_configs(runs), tcs)]
    worst = assert_same_adapters(trainer.views, refs)
    print(f"DoRA/PiSSA/LoRA together vs alone: max relative difference {worst:.2e}")


def test_relora_increlora_rosa_svd_trained_together_equal_alone():
    """ReLoRA's restart assigns a new base: its sharing ends and the fallback takes over;
    IncreLoRA's growth, RoSA's support selection and svd run through their own paths."""
    runs = [(dict(variant="relora", r=2, alpha=4.0, reset_interval=2, restart_warmup=1),
             dict(lr=1e-2, batch_size=3)),
            (dict(variant="increlora", r=2, init_r=1, add_r=1, init_warmup=1, incre_interval=2,
                  top_h=2, alpha=4.0), dict(lr=5e-3, batch_size=2)),
            (dict(variant="rosa", r=2, alpha=4.0, density=0.05, warmup_steps=1,
                  collect_steps=2), dict(lr=5e-3, batch_size=2)),
            (dict(variant="svd", r=2), dict(lr=5e-3, batch_size=2))]
    data = token_data()
    cfgs, tcs = adapter_configs(runs), train_configs(runs, seed=30)
    model, trainer = together(cfgs, tcs, data)
    assert not any(m.shares_base(0) for _, m in multi_modules(model))   # restarted
    if trainer.views[1].layers()[0][1].has_delta_path():   # IncreLoRA's fast path
        assert all(m.shares_base(1) for _, m in multi_modules(model))
    refs = [alone(c, tc, data) for c, tc in zip(adapter_configs(runs), tcs)]
    assert assert_same_adapters(trainer.views, refs) < 1e-10
    assert sum(m.ranknum for _, m in adapted_modules(trainer.views[1])) > len(TARGETS) * 2


def test_fast_path_shares_one_base_matmul_per_layer(monkeypatch):
    """One ``x W0ᵀ`` over all rows per adapted layer per forward, one ``G W0`` per backward,
    and no adapter runs its own full forward."""
    calls = {"forward": [], "backward": []}
    real_f, real_b = multi.base_forward, multi.base_backward

    def count_f(x, W, b):
        calls["forward"].append((x.shape[0], id(W)))
        return real_f(x, W, b)

    def count_b(dy, W):
        calls["backward"].append((dy.shape[0], id(W)))
        return real_b(dy, W)
    monkeypatch.setattr(multi, "base_forward", count_f)
    monkeypatch.setattr(multi, "base_backward", count_b)
    model = base_model()
    cfgs = [config("lora", r=2), config("lora", r=4, dropout=0.2), config("adalora", r=3),
            config("sora", r=2), config("increlora", r=2)]
    inject_multi(model, [(c, TARGETS, k) for k, c in enumerate(cfgs)])
    layers = multi_modules(model)
    for _, m in layers:
        for a in m.adapters.values():
            monkeypatch.setattr(a, "adapter_forward", None)   # calling it would raise
    model.zero_grad()
    rng = np.random.default_rng(0)
    batches = [(k, rng.integers(0, 64, (b, 8)), rng.integers(0, 64, (b, 8)))
               for k, b in enumerate([2, 3, 1, 2, 1])]
    losses, cache = multi_loss(model, batches)
    multi_loss_backward(model, cache, [1.0] * 5)
    rows = 9 * 8
    weights = sorted(id(m.weight.data) for _, m in layers)
    for kind in ("forward", "backward"):
        assert sorted(w for _, w in calls[kind]) == weights          # once per layer
        assert {n for n, _ in calls[kind]} == {rows}                  # over every row
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert all(any(np.abs(p.grad).sum() > 0 for p in a.parameters(trainable_only=True))
               for _, m in layers for a in m.adapters.values())   # every adapter learns


def test_fast_and_fallback_paths_agree():
    """The same adapters and batch through the shared product and through each adapter's own
    forward/backward: same outputs and gradients (float64 rounding)."""
    results = []
    for fast in (True, False):
        model = base_model()
        cfgs = [config("lora", r=2, bias="lora_only"), config("sora", r=2, dropout=0.3),
                config("adalora", r=3)]
        inject_multi(model, [(c, TARGETS, 5 + k) for k, c in enumerate(cfgs)])
        for _, m in multi_modules(model):
            m.fast = fast
            for a in m.adapters.values():   # move off the init so every gradient is nonzero
                for n, p in a.named_parameters():
                    if n.startswith("lora_") or (n == "bias" and p.trainable):
                        p.data = p.data + 0.05 * np.random.default_rng(len(n)).standard_normal(
                            p.shape)
        model.zero_grad()
        rng = np.random.default_rng(1)
        batches = [(k, rng.integers(0, 64, (2, 8)), rng.integers(0, 64, (2, 8)))
                   for k in range(3)]
        losses, cache = multi_loss(model, batches)
        multi_loss_backward(model, cache, [1.0, 0.5, 2.0])
        results.append((losses, {n: p.grad.copy() for n, p in model.named_parameters()
                                 if p.trainable}))
    (l1, g1), (l2, g2) = results
    assert np.allclose(l1, l2, rtol=1e-12, atol=0)
    assert g1.keys() == g2.keys() and len(g1) > 0
    # (k's bias has a zero gradient, softmax is shift-invariant: compare above rounding noise)
    scale = max(np.linalg.norm(g) for g in g1.values())
    assert max(np.linalg.norm(g1[n] - g2[n]) for n in g1) < 1e-12 * scale
    assert all(rel_err(g1[n], g2[n]) < 1e-11 for n in g1 if not n.endswith("k.0.bias"))


def test_view_saves_and_loads_like_a_single_adapter_model(tmp_path):
    data = token_data()
    runs = RUNS[:1] + RUNS[2:3]
    cfgs, tcs = adapter_configs(runs), train_configs(runs)
    model, trainer = together(cfgs, tcs, data)
    for k, view in enumerate(trainer.views):
        checkpoint.save_adapter(view, tmp_path / str(k))
        fresh = base_model()
        inject(fresh, adapter_configs(runs)[k], TARGETS, seed=tcs[k].seed)
        checkpoint.load_adapter(fresh, tmp_path / str(k))
        idx = np.random.default_rng(2).integers(0, 64, (2, 8))
        fresh.eval()
        view.eval()
        assert rel_err(view.forward(idx)[0], fresh.forward(idx)[0]) < 1e-12
        assert view.num_parameters(True) == fresh.num_parameters(True)
        assert view.num_parameters() == fresh.num_parameters()
    # evaluation of all adapters in one pass equals each one's own Trainer.evaluate
    together_val = trainer.evaluate()
    assert np.allclose(together_val, [tr.evaluate()["loss"] for tr in trainer.trainers], rtol=1e-12)


def test_inject_multi_rejects_shared_bias_training_and_bad_targets():
    with pytest.raises(ValueError, match="bias='all'"):
        inject_multi(base_model(), [(config("lora", r=2, bias="all"), ["q"], 0)])
    with pytest.raises(ValueError, match="match no Linear"):
        inject_multi(base_model(), [(config("lora", r=2), ["nope"], 0)])
    model = base_model()
    inject_multi(model, [(config("lora", r=2), ["q"], 0), (config("lora", r=2), ["v"], 1)])
    # adapter 0 only on q: its rows pass v's plain base
    assert [sorted(m.adapters) for _, m in multi_modules(model)] == [[0], [1]] * CFG.n_layer
    with pytest.raises(ValueError, match="no adapter 2"):
        AdapterView(model, 2)


def test_parse_variants():
    assert parse_variants("lora,lora:r=4:lr=1e-3,adalora:init=pissa") == [
        ("lora", {}), ("lora", {"r": 4, "lr": 1e-3}), ("adalora", {"init": "pissa"})]
    assert subdir_names([("lora", {}), ("dora", {})]) == ["lora", "dora"]
    assert subdir_names([("lora", {}), ("lora", {})]) == ["0-lora", "1-lora"]
    with pytest.raises(ValueError, match="full"):
        parse_variants("full,lora")


def test_cli_trains_several_adapters_into_loadable_directories(tmp_path, capsys):
    from lowrank.app import cli
    corpus = tmp_path / "text.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 300)
    base = tmp_path / "base"
    assert cli.main(["pretrain", "--out", str(base), "--steps", "2", "--vocab-size", "300",
                     "--context", "16", "--n-layer", "1", "--d-model", "16", "--batch-size",
                     "4", "--corpus", str(corpus), "--no-progress"]) == 0
    out = tmp_path / "runs"
    assert cli.main(["finetune", "--base", str(base), "--variant", "lora,dora,adalora:lr=1e-3",
                     "--out", str(out), "--steps", "3", "--batch-size", "4", "--r", "2",
                     "--corpus", str(corpus), "--no-progress", "--target-r", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 adapters trained together" in printed
    assert json.loads((out / "run.json").read_text())["adapters"] == ["lora", "dora", "adalora"]
    run = json.loads((out / "adalora" / "run.json").read_text())
    assert run["train"]["lr"] == 1e-3 and run["train"]["seed"] == 2
    assert run["config"]["target_r"] == 1
    for variant in ("lora", "dora", "adalora"):
        model, _ = wf.load_finetuned(base, out / variant)
        assert {m.variant for _, m in adapted_modules(model)} == {variant}
    assert cli.main(["finetune", "--base", str(base), "--variant", "lora,dora", "--out",
                     str(out), "--steps", "1", "--corpus", str(corpus), "--no-progress",
                     "--bogus-field", "3"]) == 2
    assert "--bogus-field" in capsys.readouterr().err


def test_finetune_many_resumes_and_matches_single_finetunes(tmp_path):
    from lowrank.app.multi_run import finetune_many
    text = tmp_path / "text.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(400)))
    spec = wf.ModelSpec(vocab_size=300, context=16, n_layer=1, n_head=2, d_model=16)
    data = wf.DataSpec([str(text)], val_fraction=0.2)
    wf.pretrain(tmp_path / "base", spec, data, TrainConfig(steps=2, batch_size=4, seed=0),
                dtype="float64", progress=False)
    variants = [("lora", {}), ("dora", {"lr": 5e-3}), ("sora", {"batch_size": 2})]

    def run(out, steps, resume=False):
        return finetune_many(out, tmp_path / "base", variants, ["q", "fc1"],
                             {"r": 2, "alpha": 4.0, "dropout": 0.1}, data,
                             TrainConfig(steps=steps, batch_size=4, lr=1e-2, seed=3),
                             resume=resume, save_every=1, progress=False)
    straight = run(tmp_path / "one", 4)
    run(tmp_path / "two", 2)
    resumed = run(tmp_path / "two", 4, resume=True)
    assert [len(r.history) for r in resumed] == [4, 4, 4]
    idx = np.random.default_rng(0).integers(0, 300, (2, 16))
    for k, (variant, own) in enumerate(variants):
        a, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "one" / variant)
        b, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "two" / variant)
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert np.array_equal(p.data, q.data), (variant, name)
        view = straight[k].model
        view.eval()
        a.eval()
        assert rel_err(a.forward(idx)[0], view.forward(idx)[0]) < 1e-13
        # the same adapter fine-tuned alone (its seed is seed + k)
        single = wf.finetune(tmp_path / f"single-{variant}", tmp_path / "base", variant,
                             ["q", "fc1"], {"r": 2, "alpha": 4.0, "dropout": 0.1}, data,
                             TrainConfig(steps=4, batch_size=own.get("batch_size", 4),
                                         lr=own.get("lr", 1e-2), seed=3 + k), progress=False)
        assert assert_same_adapters([view], [single.model]) < 1e-10
        assert straight[k].val_loss == pytest.approx(single.val_loss, rel=1e-10)


@pytest.mark.parametrize("options", [{"bogus_field": 3}, {"init_r": 12, "r": 2}])
def test_one_adapter_and_several_reject_unknown_options_alike(tmp_path, options):
    """An option none of the requested variants has is one ValueError on both paths (lora
    and dora have no ``init_r``), raised before the base is read; full takes no options."""
    from lowrank.app.multi_run import finetune_many
    base = tmp_path / "never-read"
    with pytest.raises(ValueError) as one:
        wf.finetune(tmp_path / "one", base, "lora", options=options)
    with pytest.raises(ValueError) as several:
        finetune_many(tmp_path / "two", base, [("lora", {}), ("dora", {})], options=options)
    wrong = sorted(set(options) - {"r"})
    assert str(one.value).startswith(f"unknown field(s) {wrong} for variant(s) ['lora']; ")
    assert str(several.value).startswith(f"unknown field(s) {wrong} for variant(s) "
                                         "['lora', 'dora']; ")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['r'\] for variant\(s\) "
                                         r"\['full'\]"):
        wf.finetune(tmp_path / "full", base, "full", options={"r": 2})
    # a field one of them has passes the check (and goes to that one only): the base is read
    with pytest.raises(FileNotFoundError):
        finetune_many(tmp_path / "three", base, [("lora", {}), ("adalora", {})],
                      options={"init_r": 12})
