"""Batch shards (lowrank.parallel.shards): a batch's rows split over threads gives the
gradient of one pass over the whole batch, for every registered variant, full fine-tuning,
the GPT and the BERT classifier; replicas share data and never gradients."""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.models import GPT, GPTConfig
from lowrank.parallel import BatchShards
from lowrank.parallel.shards import replicate
from lowrank.tasks import classify
from lowrank.tasks.text_data import TextBatch, TextData
from lowrank.training.trainer import Trainer, TrainConfig

from tests.helpers.common import FakeData, rel_err

TINY = GPTConfig(vocab_size=32, context=6, n_layer=2, n_head=2, d_model=8)
OPTIONS = {"adalora": {"init_r": 3, "target_r": 2}, "increlora": {"init_r": 2},
           "rosa": {"support": "random"}}


def tiny_gpt(variant=None, dtype="float64"):
    model = GPT(TINY, seed=0, dtype=dtype, xp=np)
    rng = np.random.default_rng(1)
    for _, p in model.named_parameters():   # away from the init: every gradient nonzero
        p.data = p.data + 0.3 * rng.standard_normal(p.shape).astype(dtype)
    if variant is not None:
        cfg = lr.adapters.config(variant, **{"r": 2, "alpha": 3.0, **OPTIONS.get(variant, {})})
        lr.adapters.inject(model, cfg, ["q", "k", "v", "o", "fc1", "fc2"], seed=0)
        for _, p in model.named_parameters(trainable_only=True):   # B = 0 at init: move it
            p.data = p.data + 0.1 * rng.standard_normal(p.shape).astype(dtype)
    return model


def tokens(rows=5, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, TINY.vocab_size, (rows, TINY.context))
    return x, np.roll(x, -1, axis=1)


def grads(model):
    return {n: p.grad.copy() for n, p in model.named_parameters(trainable_only=True)
            if p.grad is not None}


def plain(model, x, y):
    model.zero_grad()
    loss, cache = model.loss(x, y)
    model.loss_backward(cache)
    return loss, grads(model)


def sharded(model, x, y, k):
    model.zero_grad()
    shards = BatchShards(model, k)
    parts = shards.split(x, y)
    assert [n for n, _ in parts] == [b - a for a, b in shards.bounds(x.shape[0])]
    loss = shards.loss_backward(parts)
    return loss, grads(model)


@pytest.mark.parametrize("variant", [None] + lr.adapters.available())
@pytest.mark.parametrize("k", [2, 3])
def test_sharded_gradient_equals_one_pass(variant, k):
    """Every variant (None: full fine-tuning), 5 rows over 2 or 3 uneven shards: the loss
    and every trainable gradient agree with one pass over the batch to 1e-12 (float64)."""
    model = tiny_gpt(variant)
    x, y = tokens()
    loss, want = plain(model, x, y)
    loss_k, got = sharded(model, x, y, k)
    assert abs(loss_k - loss) < 1e-12 * abs(loss)
    assert set(got) == set(want) and want
    # against the largest gradient: some are exactly 0 in exact arithmetic (the key bias:
    # softmax ignores a shift of all scores) and are rounding noise in both runs
    scale = max(float(np.abs(g).max()) for g in want.values())
    for name in want:
        assert float(np.abs(got[name] - want[name]).max()) < 1e-12 * scale, name


def test_a_wrong_weight_is_caught():
    """The check above can fail: shards weighted 1 each (not rows_k / rows) are off."""
    model = tiny_gpt("lora")
    x, y = tokens()
    _, want = plain(model, x, y)
    model.zero_grad()
    shards = BatchShards(model, 2)
    for a, b in shards.bounds(5):
        loss, cache = model.loss(x[a:b], y[a:b])
        model.loss_backward(cache)
    assert max(rel_err(grads(model)[n], want[n]) for n in want) > 0.1


def test_increlora_score_gradient_is_summed_over_shards():
    """IncreLoRA keeps ∂L/∂ΔW from its backward (the score): the shards' add up."""
    model = tiny_gpt("increlora")
    layers = [m for _, m in lr.adapters.adapted_modules(model)]
    for m in layers:
        m.track_score = True
    x, y = tokens()
    plain(model, x, y)
    want = [m.grad_dW.copy() for m in layers]
    for m in layers:
        m.grad_dW = None
    sharded(model, x, y, 2)
    for m, w in zip(layers, want):
        assert rel_err(m.grad_dW, w) < 1e-12


def test_replica_shares_data_not_gradients():
    model = tiny_gpt("lora")
    model.zero_grad()
    twin = replicate(model)
    pairs = list(zip(model.named_parameters(), twin.named_parameters()))
    assert len(pairs) == len(list(model.named_parameters()))
    for (n, p), (m, q) in pairs:
        assert n == m and q.data is p.data and q.trainable == p.trainable
        # trainable: a Parameter of its own (its own gradient); frozen: the same one
        assert (p is not q) if p.trainable else (p is q)
        assert q.grad is None
    assert twin.blocks[0] is not model.blocks[0]
    if model.head_weight is model.tok_emb.weight:   # tied weights stay tied in the replica
        assert twin.head_weight is twin.tok_emb.weight


def test_a_quantized_base_is_shared_not_dequantized_per_replica(monkeypatch):
    model = tiny_gpt("lora", dtype="float32")
    lr.quantize_base(model, "nf4")
    frozen = [p for _, p in model.named_parameters() if getattr(p, "is_quantized", False)]
    assert frozen
    x, y = tokens()
    expected = plain(model, x, y)
    calls = []
    for p in frozen:   # a dequantisation of a whole weight would go through .data
        original = type(p)._dequantized
        monkeypatch.setattr(type(p), "_dequantized",
                            lambda self, f=original: (calls.append(self), f(self))[1])
    twin = replicate(model)
    assert all(q is p for p in frozen for q in [dict(twin.named_parameters())[
        next(n for n, r in model.named_parameters() if r is p)]])
    assert calls == []
    loss, got = sharded(model, x, y, 2)
    assert abs(loss - expected[0]) < 1e-5
    assert all(rel_err(got[n], expected[1][n]) < 1e-4 for n in expected[1])


def test_dropout_streams_are_reproducible_and_per_shard():
    """With adapter dropout the masks come from per-shard streams: a rerun from the same
    state gives the same gradients bit for bit."""
    def run():
        model = tiny_gpt(None)
        lr.adapters.inject(model, lr.adapters.config("lora", r=2, dropout=0.5), ["q", "fc1"],
                           seed=4)
        x, y = tokens()
        return sharded(model, x, y, 2)
    (loss_a, a), (loss_b, b) = run(), run()
    assert loss_a == loss_b and all(np.array_equal(a[n], b[n]) for n in a)


def test_trainer_with_shards_follows_the_one_thread_run():
    """Five AdamW steps of LoRA, shards=2 against 1 (float64, no dropout): parameters
    agree to 1e-10."""
    def run(shards):
        model = tiny_gpt("lora")
        trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=5, batch_size=5, lr=1e-2,
                                                             warmup=1, shards=shards))
        losses = [trainer.train_step()["loss"] for _ in range(5)]
        return losses, {n: p.data.copy() for n, p in model.named_parameters()}
    (l1, p1), (l2, p2) = run(1), run(2)
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-10
    assert max(rel_err(p2[n], p1[n]) for n in p1) < 1e-10


def test_classifier_batches_split_by_rows():
    """The BERT classifier through ClassifierTrainer: each shard's TextBatch is cut to its
    own longest row, and the step's loss and gradients equal the one-pass ones."""
    cfg = lr.models.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=16,
                               max_position_embeddings=16)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 30, (6, 7))
    mask = np.ones_like(ids)
    mask[3:, 4:] = 0                       # the second shard's rows are 4 tokens long
    batch = TextBatch(ids * mask, mask, rng.integers(0, 2, 6))
    assert batch.rows(3, 6).ids.shape == (3, 4)

    def run(shards):
        clf = lr.models.SequenceClassifier(lr.models.Bert(cfg, seed=3, dtype="float64",
                                                          xp=np), num_labels=2, seed=0,
                                           dropout=0.0)
        classify.prepare(clf, "lora", {"r": 2, "dropout": 0.0})
        clf.encoder.set_dropout(0.0, seed=0)
        data = TextData({"train": (ids * mask, mask, batch.labels)}, ["0", "1"], max_length=7)
        trainer = classify.ClassifierTrainer(clf, data, TrainConfig(steps=1, batch_size=6,
                                                                    shards=shards))
        record = trainer.train_step()
        return record["loss"], {n: p.data.copy() for n, p in clf.named_parameters()}
    (l1, p1), (l2, p2) = run(1), run(2)
    assert abs(l1 - l2) < 1e-12 and max(rel_err(p2[n], p1[n]) for n in p1) < 1e-12


def test_bad_shards_raise():
    with pytest.raises(ValueError, match="shards"):
        TrainConfig(shards=0)
    with pytest.raises(ValueError, match="shards"):
        BatchShards(tiny_gpt(), 1.5)
    strict = GPT(TINY, seed=0, dtype="float64", xp=backend.namespace("numpy-strict"))
    with pytest.raises(ValueError, match="numpy backend"):
        BatchShards(strict, 2)
    assert BatchShards(tiny_gpt(), 4).bounds(3) == [(0, 1), (1, 2), (2, 3)]


def test_rosa_score_squares_the_batch_gradient_not_each_shard():
    """RoSA picks its support from (Gᵀx)² of the whole batch: with shards the raw Gᵀx is
    summed over them first (as data parallel does), so the selected support and the
    parameters after three steps equal the one-thread run's."""
    def run(shards):
        model = tiny_gpt(None)
        lr.adapters.inject(model, lr.adapters.config("rosa", r=2, density=0.2), ["q", "fc1"],
                           seed=0)
        trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=3, batch_size=5, lr=1e-2,
                                                             warmup=1, shards=shards))
        for _ in range(3):
            trainer.train_step()
        return {n: p.data.copy() for n, p in model.named_parameters()}
    one, two = run(1), run(2)
    support = [n for n in one if n.endswith("rosa_indices")]
    assert support and all(np.array_equal(one[n], two[n]) for n in support)
    assert all((one[n] >= 0).all() for n in support)          # selected at step 1
    assert max(rel_err(two[n], one[n]) for n in one) < 1e-10


def test_accumulation_and_errors_with_shards():
    """Two micro-batches of 3 rows, each over 2 shards, against one thread; a shard whose
    forward raises surfaces in the caller after every shard has stopped; several adapters
    at once refuse shards."""
    def run(shards):
        model = tiny_gpt("lora")
        trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=2, batch_size=3, lr=1e-2,
                                                             warmup=1, accum_steps=2,
                                                             shards=shards))
        trainer.train_step()
        return {n: p.data.copy() for n, p in model.named_parameters()}
    one, two = run(1), run(2)
    assert max(rel_err(two[n], one[n]) for n in one) < 1e-10
    model = tiny_gpt("lora")
    x, y = tokens()
    shards = BatchShards(model, 2)
    bad = y.copy()
    bad[3, 0] = TINY.vocab_size                    # out of range, in the second shard's rows
    with pytest.raises(ValueError, match="targets"):
        shards.loss_backward(shards.split(x, bad))
    from lowrank.app.multi_run import MultiTrainer
    from lowrank.multi.modules import inject_multi
    base = tiny_gpt(None)
    inject_multi(base, [(lr.adapters.config("lora", r=2), ["q"], 0)] * 2)
    with pytest.raises(ValueError, match="shards"):
        MultiTrainer(base, [(FakeData(TINY), TrainConfig(shards=2))] * 2)
