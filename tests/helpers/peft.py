"""The lowrank side of the PEFT round trips (tests/files/test_peft_dirs.py, test_peft_api.py)."""
import numpy as np

import lowrank as lr
from lowrank import backend
from lowrank.adapters import adapted_modules
from lowrank.nn.layers import Linear
from lowrank.nn.module import Module


class StandInClassifier(Module):
    """HF BertForSequenceClassification's map (pooler -> classifier) with the attribute names
    of ``lr.models.SequenceClassifier`` (encoder, classifier), used while that class is not
    on this branch; the head always trains (PEFT's modules_to_save)."""

    def __init__(self, encoder, weight, bias):
        self.encoder = encoder
        self.classifier = Linear.from_arrays(weight, bias)

    def freeze(self) -> None:
        self.encoder.freeze()

    def forward(self, ids, attention_mask=None):
        hidden, _ = self.encoder.forward(ids, attention_mask=attention_mask)
        pooled, _ = self.encoder.pool(hidden)
        logits, _ = self.classifier.forward(pooled)
        return logits, None


def classifier_from(encoder, hf_dir):
    """A classifier over ``encoder`` with the head of the transformers checkpoint ``hf_dir``
    (``lr.models.SequenceClassifier`` when it exists)."""
    saved = lr.files.storage.read_safetensors(hf_dir / "model.safetensors")
    W, b = saved["classifier.weight"], saved["classifier.bias"]
    cls = getattr(lr.models, "SequenceClassifier", None)
    if cls is None:
        return StandInClassifier(encoder, W, b).eval()
    model = cls(encoder, num_labels=W.shape[0], pooling="cls")
    model.classifier.weight.data, model.classifier.bias.data = W.copy(), b.copy()
    return model.eval()


def host(a):
    return np.asarray(backend.to_numpy(a))


def gpt_out(model, ids, mask=None):
    return host(model.forward(ids)[0])


def bert_out(model, ids, mask=None):
    return host(model.forward(ids, attention_mask=mask)[0])


classifier_out = bert_out


def randomize_adapters(model, seed: int, scale: float = 0.1) -> None:
    """Every trainable parameter off its init: adapter tensors random, DoRA magnitudes and
    heads scaled by 1 + noise."""
    rng = np.random.default_rng(seed)
    adapters = {id(p) for _, m in adapted_modules(model) for p in m.parameters()}
    for name, p in model.named_parameters(trainable_only=True):
        noise = rng.standard_normal(p.shape)
        if "magnitude" in name or id(p) not in adapters:
            p.data = (host(p.data) * (1 + scale * noise)).astype(p.dtype)
        else:
            p.data = (scale * noise).astype(p.dtype)


def own_weights(model) -> dict:
    return {n: host(p.data) for n, p in model.named_parameters()}
