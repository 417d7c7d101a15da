"""SequenceClassifier: pooling, dropout and head gradients against central differences
(float64), the head's init and trainability, and the loss falling for every variant.

The encoder here is a tiny stand-in with ``lr.models.Bert``'s interface and module names
(``encoder.layer.{i}.attention.self.query`` ...), so every test runs without weights.
"""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.nn.layers import Linear
from lowrank.models.classifier import SequenceClassifier, mean_pool_backward, mean_pool_forward
from lowrank.ops.dropout import dropout_backward, dropout_forward
from lowrank.nn.module import Module, Parameter
from lowrank.tasks import classify
from lowrank.tasks.text_data import TextData
from tests.helpers.common import rel_err, to_host


class _Namespace(Module):
    """Attribute holder so parameter names follow BERT's (``attention.self.query``)."""

    def __init__(*args, **children):
        for k, v in children.items():
            setattr(args[0], k, v)


class FakeLayer(Module):
    """``h1 = x + o(tanh(q(x)) ⊙ k(x) + v(x))``, ``out = h1 + f2(tanh(f1(h1)))`` (no attention:
    tokens do not mix, enough to exercise every adapted linear and the head)."""

    def __init__(self, d, rng, dtype):
        def lin(n_in, n_out):
            w = rng.standard_normal((n_out, n_in)).astype(dtype) * 0.3
            return Linear.from_arrays(w, (rng.standard_normal(n_out) * 0.1).astype(dtype))
        self.attention = _Namespace(self=_Namespace(query=lin(d, d), key=lin(d, d),
                                                    value=lin(d, d)),
                                    output=_Namespace(dense=lin(d, d)))
        self.intermediate = _Namespace(dense=lin(d, 2 * d))
        self.output = _Namespace(dense=lin(2 * d, d))

    def forward(self, x):
        a = self.attention
        q, cq = a.self.query.forward(x)
        k, ck = a.self.key.forward(x)
        v, cv = a.self.value.forward(x)
        tq = np.tanh(q)
        o, co = a.output.dense.forward(tq * k + v)
        h1 = x + o
        f, cf = self.intermediate.dense.forward(h1)
        tf = np.tanh(f)
        g, cg = self.output.dense.forward(tf)
        return h1 + g, (cq, ck, cv, tq, k, co, cf, tf, cg)

    def backward(self, dy, cache):
        cq, ck, cv, tq, k, co, cf, tf, cg = cache
        a = self.attention
        dtf = self.output.dense.backward(dy, cg)
        dh1 = dy + self.intermediate.dense.backward(dtf * (1 - tf * tf), cf)
        dm = a.output.dense.backward(dh1, co)
        dx = dh1 + a.self.value.backward(dm, cv)
        dx += a.self.key.backward(dm * tq, ck)
        dx += a.self.query.backward(dm * k * (1 - tq * tq), cq)
        return dx


class FakeEncoder(Module):
    """Embedding + ``n_layer`` FakeLayers + a pooler, with Bert's forward/backward signature."""

    def __init__(self, vocab=20, d=8, n_layer=1, seed=0, dtype="float64"):
        rng = np.random.default_rng(seed)
        self.embeddings = _Namespace(word_embeddings=_Namespace(
            weight=Parameter(rng.standard_normal((vocab, d)).astype(dtype))))
        self.encoder = _Namespace(layer=[FakeLayer(d, rng, dtype) for _ in range(n_layer)])
        self.pooler = _Namespace(dense=Linear.from_arrays(
            rng.standard_normal((d, d)).astype(dtype) * 0.3, np.zeros(d, dtype)))

    @property
    def xp(self):
        return np

    def forward(self, ids, attention_mask=None, token_type_ids=None):
        W = self.embeddings.word_embeddings.weight
        x = W.data[ids]                                       # (B, T, d)
        caches = []
        for layer in self.encoder.layer:
            x, c = layer.forward(x)
            caches.append(c)
        return x, (ids, caches)

    def pool(self, hidden):
        """Bert's pooler: ``tanh(h[:, 0] Wpᵀ + bp)``."""
        y, c = self.pooler.dense.forward(hidden[:, 0])
        pooled = np.tanh(y)
        return pooled, (c, pooled, hidden.shape)

    def pool_backward(self, dpooled, cache):
        c, pooled, shape = cache
        dhidden = np.zeros(shape)
        dhidden[:, 0] = self.pooler.dense.backward(dpooled * (1 - pooled ** 2), c)
        return dhidden

    def backward(self, dhidden, cache):
        ids, caches = cache
        dx = dhidden
        for layer, c in zip(reversed(self.encoder.layer), reversed(caches)):
            dx = layer.backward(dx, c)
        W = self.embeddings.word_embeddings.weight
        if W.trainable:
            dW = np.zeros_like(W.data)
            np.add.at(dW, ids.reshape(-1), dx.reshape(-1, dx.shape[-1]))
            W.accumulate(dW)


def _batch(rng, B=4, T=6, vocab=20, C=3):
    ids = rng.integers(0, vocab, (B, T))
    lengths = rng.integers(2, T + 1, B)
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask, rng.integers(0, C, B)


def _fd(f, array, eps=1e-6):
    grad = np.zeros(array.shape)
    for idx in np.ndindex(*array.shape):
        old = float(array[idx])
        array[idx] = old + eps
        up = f()
        array[idx] = old - eps
        down = f()
        array[idx] = old
        grad[idx] = (up - down) / (2 * eps)
    return grad


# --- the functional pairs ------------------------------------------------------------------

def test_mean_pool_gradient_and_pads(xp, rng):
    ids, mask, _ = _batch(rng)
    h = xp.asarray(rng.standard_normal((*mask.shape, 5)))
    m = xp.asarray(mask)
    G = rng.standard_normal((mask.shape[0], 5))
    pooled, cache = mean_pool_forward(h, m)
    want = (to_host(h) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert rel_err(pooled, want) < 1e-14
    dh = to_host(mean_pool_backward(xp.asarray(G), cache))
    hh = to_host(h)
    numeric = _fd(lambda: float((mean_pool_forward(hh, mask)[0] * G).sum()), hh)
    assert rel_err(dh, numeric) < 1e-8
    assert np.all(dh[mask == 0] == 0)          # pads get no gradient


def test_pooling_ignores_pad_content(rng):
    ids, mask, _ = _batch(rng)
    h = rng.standard_normal((*mask.shape, 5))
    h2 = h.copy()
    h2[mask == 0] = 1e3
    assert np.array_equal(mean_pool_forward(h, mask)[0], mean_pool_forward(h2, mask)[0])


def test_dropout_pair(rng):
    x = rng.standard_normal((400, 50))
    drng = backend.DeviceRNG(3, np)
    y, mask = dropout_forward(x, 0.1, drng)
    kept = mask != 0
    assert 0.85 < kept.mean() < 0.95
    assert np.allclose(y[kept], x[kept] / 0.9) and np.all(y[~kept] == 0)
    G = rng.standard_normal(x.shape)
    assert np.array_equal(dropout_backward(G, mask), G * mask)   # linear in x: exact
    same, none = dropout_forward(x, 0.1, drng, training=False)
    assert same is x and none is None and dropout_backward(G, None) is G


# --- the module ----------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_gradients_match_finite_differences(pooling, rng):
    enc = FakeEncoder(seed=1)
    clf = SequenceClassifier(enc, num_labels=3, pooling=pooling, seed=0, dropout=0.2)
    ids, mask, labels = _batch(rng)
    clf.train()
    state = clf._dropout_rng.state

    def loss():
        clf._dropout_rng.state = state          # the same dropout mask every call
        return clf.loss(ids, mask, labels)[0]

    clf.zero_grad()
    clf._dropout_rng.state = state
    _, cache = clf.loss(ids, mask, labels)
    clf.loss_backward(cache)
    checked = 0
    for name, p in clf.named_parameters(trainable_only=True):
        if name.startswith("encoder.embeddings") or (pooling == "mean" and "pooler" in name):
            continue
        numeric = _fd(loss, p.data)
        assert rel_err(p.grad, numeric) < 1e-6, name
        checked += 1
    assert checked >= 10 + (pooling == "cls") * 2


def test_head_init_and_always_trainable():
    enc = FakeEncoder(d=64)
    clf = SequenceClassifier(enc, num_labels=5, seed=0)
    W, b = clf.classifier.weight, clf.classifier.bias
    assert W.shape == (5, 64) and abs(W.data.std() - 0.02) < 0.003 and not b.data.any()
    clf.freeze()
    assert [n for n, _ in clf.named_parameters(trainable_only=True)] == \
        ["classifier.weight", "classifier.bias"]
    clf2 = SequenceClassifier(FakeEncoder(d=64), num_labels=5, seed=0)
    assert np.array_equal(clf2.classifier.weight.data, W.data)      # seeded
    lr.adapters.inject(clf2, lr.adapters.config("lora"), ["query", "value"])
    names = [n for n, _ in clf2.named_parameters(trainable_only=True)]
    assert "classifier.weight" in names and any("lora_A" in n for n in names)
    assert not any(n.endswith("query.weight") for n in names)


def test_loss_is_mean_cross_entropy(rng):
    clf = SequenceClassifier(FakeEncoder(), num_labels=3, dropout=0.0)
    ids, mask, labels = _batch(rng)
    logits, _ = clf.forward(ids, attention_mask=mask)
    z = logits - logits.max(1, keepdims=True)
    want = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))
    assert abs(clf.loss(ids, mask, labels)[0] - want) < 1e-12
    p = clf.predict_proba(ids, mask)
    assert np.allclose(p.sum(1), 1.0)


def test_head_only_skips_the_encoder_backward(rng):
    clf = SequenceClassifier(FakeEncoder(), num_labels=3)
    clf.freeze()
    clf.zero_grad()
    ids, mask, labels = _batch(rng)
    _, cache = clf.loss(ids, mask, labels)
    clf.encoder.backward = None                  # would raise if called
    clf.loss_backward(cache)
    assert np.abs(clf.classifier.weight.grad).sum() > 0


def test_invalid_arguments():
    enc = FakeEncoder()
    for kwargs, field in (({"num_labels": 1}, "num_labels"), ({"pooling": "max"}, "pooling"),
                          ({"dropout": 1.0}, "dropout")):
        with pytest.raises(ValueError, match=field):
            SequenceClassifier(enc, **{"num_labels": 2, **kwargs})
    del enc.pooler
    with pytest.raises(ValueError, match="pooler"):
        SequenceClassifier(enc, 2, pooling="cls")


# --- every variant trains the classifier ---------------------------------------------------

def _toy_data(n=64, T=8, seed=0):
    """Label = whether token 1 occurs: learnable from mean-pooled embeddings."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 20, (n, T))
    labels = rng.integers(0, 2, n)
    ids[labels == 1, rng.integers(1, T, int(labels.sum()))] = 1
    arrays = (ids, np.ones_like(ids), labels)
    return TextData({"train": arrays, "val": arrays}, ["0", "1"], max_length=T)


def _train_toy(variant):
    """(loss before, val loss after 6 epochs) of a 2-layer fake encoder on the toy task."""
    clf = SequenceClassifier(FakeEncoder(dtype="float32", n_layer=2), num_labels=2, seed=0)
    options = {"init_r": 4, "target_r": 2} if variant == "adalora" else {}
    options.update({"reset_interval": 8} if variant == "relora" else {})
    options.update({"init_warmup": 2, "incre_interval": 4} if variant == "increlora" else {})
    classify.prepare(clf, variant, {"r": 4, **options})
    data = _toy_data()
    config = classify.ClassifyConfig(epochs=6, batch_size=16,
                                     lr=1e-2 if variant != "full" else 3e-3)
    before = classify.evaluate(clf, data)["loss"]
    out = classify.train_classifier(clf, data, variant, config, progress=False)
    assert len(out["epochs"]) == 6 and out["steps"] == 24
    return before, out["epochs"][-1]["val_loss"]


@pytest.fixture(scope="module")
def head_only_loss():
    return _train_toy("head")[1]


@pytest.mark.parametrize("variant", ["full"] + lr.adapters.available())
def test_every_variant_trains_the_classifier(variant, head_only_loss):
    """The loss falls, and further than with the head alone: the encoder's adapters learn."""
    before, after = _train_toy(variant)
    assert after < 0.95 * before, (variant, before, after)
    assert after < head_only_loss, (variant, head_only_loss, after)


def test_schedule_is_linear_warmup_then_decay():
    from lowrank.nn.schedules import scheduled_lr
    assert classify.ClassifyConfig().schedule == "linear"
    lrs = [scheduled_lr("linear", k, 1.0, 4, 20) for k in range(21)]
    assert lrs[0] == 0.0 and lrs[2] == 0.5 and lrs[4] == 1.0 and lrs[12] == 0.5
    assert lrs[20] == 0.0 and classify.warmup_steps(171, 0.1) == 18


def test_metrics_accuracy_and_macro_f1():
    m = classify.metrics([0, 1, 2, 2], [0, 1, 1, 2], 3)
    assert m["accuracy"] == 0.75 and m["correct"] == 3 and m["count"] == 4
    assert abs(m["macro_f1"] - np.mean([1.0, 2 / 3, 2 / 3])) < 1e-12
    assert "macro_f1" not in classify.metrics([0, 1], [0, 0], 2)


# --- a tiny random BERT: the real encoder, with its hidden dropout on ---------------------

def _tiny_bert(dtype="float64"):
    cfg = lr.models.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=16,
                               max_position_embeddings=16)
    return lr.models.Bert(cfg, seed=3, dtype=dtype, xp=np)


def _rngs(module):
    """Every dropout stream in ``module`` (the encoder's, each layer's hidden and attention
    streams, adapters', head's)."""
    found = []
    for _, m in module.named_modules():
        for attr in ("dropout_rng", "_dropout_rng", "attention_rng"):
            r = vars(m).get(attr)
            if r is not None:
                found.append(r)
    return found


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bert_classifier_with_dropout_matches_finite_differences(pooling, rng):
    bert = _tiny_bert()
    bert.set_dropout(0.2)
    clf = SequenceClassifier(bert, num_labels=3, pooling=pooling, dropout=0.2)
    classify.prepare(clf, "lora", {"r": 2, "dropout": 0.3})
    ids, mask, labels = _batch(rng, vocab=30)
    clf.train()
    streams = _rngs(clf)
    assert len(streams) == 1 + 2 * 2 + 1 + 12    # encoder, 2 layers x 2, head, 2 x 6 adapters
    states = [s.state for s in streams]

    def loss():
        for s, st in zip(streams, states):
            s.state = st
        return clf.loss(ids, mask, labels)[0]

    names = ["classifier.weight", "encoder.encoder.layer.0.attention.self.query.lora_A",
             "encoder.encoder.layer.0.output.dense.lora_B",
             "encoder.encoder.layer.1.intermediate.dense.lora_A"]
    params = dict(clf.named_parameters(trainable_only=True))
    for name in names:
        p = params[name]
        if not np.abs(p.data).any():
            p.data[...] = rng.standard_normal(p.shape) * 0.1   # a zero B hides A's gradient
    clf.classifier.weight.data *= 50.0       # gradients well above finite-difference noise
    clf.zero_grad()
    for s, st in zip(streams, states):
        s.state = st
    _, cache = clf.loss(ids, mask, labels)
    clf.loss_backward(cache)
    for name in names:
        assert rel_err(params[name].grad, _fd(loss, params[name].data, 1e-5)) < 1e-6, name


def test_bert_dropout_only_in_training(rng):
    bert = _tiny_bert()
    ids, mask, _ = _batch(rng, vocab=30)
    plain, _ = bert.forward(ids, attention_mask=mask)
    bert.set_dropout(0.1)
    bert.train()
    dropped, _ = bert.forward(ids, attention_mask=mask)
    bert.eval()
    again, _ = bert.forward(ids, attention_mask=mask)
    assert np.array_equal(plain, again) and not np.allclose(plain, dropped)
    with pytest.raises(ValueError, match="dropout"):
        bert.set_dropout(1.0)


def test_full_fine_tuning_freezes_only_an_unused_pooler():
    mean = SequenceClassifier(FakeEncoder(), num_labels=2, pooling="mean")
    classify.prepare(mean, "full")
    frozen = [n for n, p in mean.named_parameters() if not p.trainable]
    assert frozen == ["encoder.pooler.dense.weight", "encoder.pooler.dense.bias"]
    cls = SequenceClassifier(FakeEncoder(), num_labels=2, pooling="cls")
    classify.prepare(cls, "full")
    assert all(p.trainable for p in cls.parameters())
