"""The loss on labelled positions with the head computed only there (float64, tiny Llama):
equal to the whole-head oracle, gradients against finite differences, the head's product on
the labelled rows alone, and planted bugs (a label shifted by one, the mask on the wrong side)
caught without torch."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.models.labelled_loss import IGNORE, labelled_loss_value
from lowrank.models.llama import Llama
from lowrank.models.llama_config import LlamaConfig
from reference.finite_diff import numerical_gradient
from tests.helpers.common import rel_err, to_host

SIZES = dict(vocab_size=23, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
IDS = np.array([[1, 4, 7, 2, 19, 5, 6], [3, 3, 0, 11, 5, 2, 2]])
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])      # right padding
LABELLED = np.array([[0, 0, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 0, 0]], dtype=bool)   # token t+1


def targets_of(ids, labelled):
    """The naive rule: at position t predict token t+1 when token t+1 is the assistant's."""
    out = np.full(ids.shape, IGNORE, dtype=np.int64)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labelled[b, t + 1]:
                out[b, t] = ids[b, t + 1]
    return out


TARGETS = targets_of(IDS, LABELLED)


def model_with_adapter(seed=0, tied=True):
    model = Llama(LlamaConfig(**SIZES, tie_word_embeddings=tied), seed=seed, dtype="float64")
    lr.adapters.inject(model, lr.adapters.config("lora", r=2), "all-linear")
    rng = np.random.default_rng(seed + 1)
    for _, layer in lr.adapters.adapted_modules(model):   # B off zero: every path has a gradient
        for _, p in layer.named_parameters(trainable_only=True):
            p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    model.head_weight.trainable = True                    # the head's backward is checked too
    return model


def oracle_loss(model, ids, targets, mask):
    """Every position's logits (the whole head), then the mean over labelled ones, float64."""
    logits, _ = model.forward(ids, mask)
    z = to_host(logits).reshape(-1, SIZES["vocab_size"])
    t = targets.reshape(-1)
    keep = t >= 0
    z, t = z[keep], t[keep]
    logz = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return float(np.mean(logz - z[np.arange(len(t)), t]))


def test_labelled_loss_equals_the_whole_head_oracle():
    model = model_with_adapter()
    loss, _ = model.loss(IDS, TARGETS, MASK)
    assert abs(loss - oracle_loss(model, IDS, TARGETS, MASK)) < 1e-12
    # no ignored target: the ordinary path, the same number
    full = np.where(TARGETS >= 0, TARGETS, 0)
    assert abs(model.loss(IDS, full, MASK)[0] - oracle_loss(model, IDS, full, MASK)) < 1e-12


def test_scoring_without_a_cache_gives_the_same_loss_and_keeps_nothing():
    model = model_with_adapter()
    model.eval()
    loss, _ = model.loss(IDS, TARGETS, MASK)
    assert labelled_loss_value(model, IDS, TARGETS, MASK) == loss
    logits, cache = model.forward(IDS, MASK)
    scored, none = model.forward(IDS, MASK, keep_cache=False)
    assert none is None and np.array_equal(to_host(scored), to_host(logits))
    with pytest.raises(ValueError, match="no position carries a label"):
        labelled_loss_value(model, IDS, np.full(IDS.shape, IGNORE), MASK)


def test_head_runs_only_on_labelled_rows(monkeypatch):
    model = model_with_adapter()
    rows = []
    original = model.head_forward
    monkeypatch.setattr(model, "head_forward",
                        lambda h: (rows.append(h.shape), original(h))[1])
    _, cache = model.loss(IDS, TARGETS, MASK)
    assert rows == [(int((TARGETS >= 0).sum()), SIZES["hidden_size"])]
    model.loss_backward(cache)


@pytest.mark.parametrize("tied", [True, False])
def test_labelled_loss_gradients_against_finite_differences(tied):
    model = model_with_adapter(tied=tied)
    model.zero_grad()
    _, cache = model.loss(IDS, TARGETS, MASK)
    model.loss_backward(cache, dloss=1.0)
    worst = 0.0
    for name, p in model.named_parameters(trainable_only=True):
        numeric = numerical_gradient(lambda: model.loss(IDS, TARGETS, MASK)[0], p.data)
        err = rel_err(to_host(p.grad), numeric)
        worst = max(worst, err)
        assert err < 1e-6, (name, err)
    print(f"labelled loss, tied={tied}: max relative error {worst:.2e}")


def test_frozen_trunk_gets_no_gradient_and_head_trains():
    model = Llama(LlamaConfig(**SIZES, tie_word_embeddings=False), seed=0, dtype="float64")
    model.freeze()
    model.lm_head.weight.trainable = True
    model.zero_grad()
    _, cache = model.loss(IDS, TARGETS, MASK)
    model.loss_backward(cache)
    numeric = numerical_gradient(lambda: model.loss(IDS, TARGETS, MASK)[0], model.lm_head.weight.data)
    assert rel_err(to_host(model.lm_head.weight.grad), numeric) < 1e-6
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None


# --- planted bugs, caught by the oracle and the naive rule ---------------------------------------

def shifted_targets(ids, labelled):          # a label shifted by one: token t predicted at t
    return np.where(labelled, ids, IGNORE)


def wrong_side_targets(ids, labelled):       # the mask read at the input position t
    out = np.full(ids.shape, IGNORE, dtype=np.int64)
    out[:, :-1] = np.where(labelled[:, :-1], ids[:, 1:], IGNORE)
    return out


@pytest.mark.parametrize("buggy", [shifted_targets, wrong_side_targets])
def test_planted_label_bugs_are_caught(buggy):
    wrong = buggy(IDS, LABELLED)
    assert not np.array_equal(wrong, TARGETS)   # the naive rule flags the builder
    model = model_with_adapter()
    truth = oracle_loss(model, IDS, TARGETS, MASK)
    assert abs(model.loss(IDS, wrong, MASK)[0] - truth) > 1e-3   # and the loss moves


def test_planted_row_bug_in_the_loss_is_caught():
    """The head applied to the hidden rows one position off (the mask on the wrong side of
    the shift) disagrees with the oracle; the real gather agrees."""
    from lowrank.ops.cross_entropy import cross_entropy_forward
    model = model_with_adapter()
    truth = oracle_loss(model, IDS, TARGETS, MASK)
    hidden, _ = model.forward(IDS, MASK, logits=False)
    flat = TARGETS.reshape(-1)
    rows = np.nonzero(flat >= 0)[0]

    def loss_at(hidden_rows):
        logits, _ = model.head_forward(hidden.reshape(-1, SIZES["hidden_size"])[hidden_rows])
        return cross_entropy_forward(logits[None], flat[rows][None])[0]

    assert abs(loss_at(rows) - truth) < 1e-12
    assert abs(loss_at(rows + 1) - truth) > 1e-3


def test_all_ignored_is_an_error():
    model = model_with_adapter()
    with pytest.raises(ValueError, match="no position carries a label"):
        model.loss(IDS, np.full(IDS.shape, IGNORE), MASK)


def test_batch_shards_weight_each_share_by_its_labelled_tokens():
    """Two shards whose rows hold 1 and 5 labelled tokens: weighted by labels (not rows) the
    gradient is the one-pass gradient; a row-weighted split would be far off. A share cut to
    its own longest row computes no all-padding column."""
    from lowrank.parallel import BatchShards
    from lowrank.tasks.chat_data import ChatBatch
    labelled = np.array([[0, 0, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1, 0]], dtype=bool)
    mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    batch = ChatBatch(IDS, targets_of(IDS, labelled), mask)
    model = model_with_adapter()
    model.zero_grad()
    loss, cache = model.loss(*batch.args)
    model.loss_backward(cache)
    want = {n: p.grad.copy() for n, p in model.named_parameters(trainable_only=True)}
    shares = [batch.take(0, 1), batch.take(1, 2)]
    assert [s.loss_terms for s in shares] == [1, 5] and shares[1].ids.shape == (1, 6)
    for weights_by, close in (("labels", True), ("rows", False)):
        model.zero_grad()
        parts = [(s.loss_terms if weights_by == "labels" else 1, s.args) for s in shares]
        got_loss = BatchShards(model, 2).loss_backward(parts)
        err = max(rel_err(p.grad, want[n]) for n, p in model.named_parameters(trainable_only=True))
        assert (err < 1e-12 and abs(got_loss - loss) < 1e-12) == close, (weights_by, err)
