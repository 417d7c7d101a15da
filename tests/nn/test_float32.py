"""float32 stays float32: every array a float32 training step creates (the caches its
forward keeps, every gradient, the optimizer state) is float32, for the GPT with LoRA and
dropout and for BERT with a key-padding mask; no silent float64 promotion."""
import numpy as np

import lowrank as lr
from lowrank import backend
from lowrank.nn.optim import AdamW


def arrays_in(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if hasattr(obj, "dtype") and hasattr(obj, "shape"):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from arrays_in(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from arrays_in(v, seen)


def float_dtypes(*objs):
    return {a.dtype.name for o in objs for a in arrays_in(o) if a.dtype.kind == "f"}


def test_gpt_lora_step_is_float32_throughout(xp):
    cfg = lr.GPTConfig(vocab_size=40, context=16, n_layer=2, n_head=2, d_model=16)
    model = lr.GPT(cfg, dtype="float32", xp=xp)
    lr.adapters.inject(model, lr.adapters.config("lora", r=2, dropout=0.1), ["q", "v", "fc1"])
    rng = np.random.default_rng(0)
    idx, tgt = (backend.asarray(rng.integers(0, 40, (2, 16)), xp=xp) for _ in range(2))
    loss, cache = model.loss(idx, tgt)
    kept = float_dtypes(cache)
    model.loss_backward(cache)
    opt = AdamW(model.named_parameters(trainable_only=True), lr=1e-3)
    opt.step()
    grads = [p.grad for _, p in model.named_parameters(trainable_only=True)]
    assert kept == {"float32"} and float_dtypes(grads, opt.state) == {"float32"}


def test_bert_masked_step_is_float32_throughout(xp):
    cfg = lr.models.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=24)
    model = lr.models.Bert(cfg, dtype="float32", xp=xp)
    rng = np.random.default_rng(1)
    ids = backend.asarray(rng.integers(1, 30, (2, 7)), xp=xp)
    mask = backend.asarray(np.array([[1] * 7, [1] * 4 + [0] * 3]), xp=xp)
    hidden, cache = model.forward(ids, attention_mask=mask)
    kept = float_dtypes(hidden, cache)
    model.backward(backend.asarray(rng.standard_normal(hidden.shape), "float32", xp), cache)
    grads = [p.grad for _, p in model.named_parameters()]
    assert kept == {"float32"} and float_dtypes(grads) == {"float32"}
