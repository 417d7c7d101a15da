"""A classification head over an encoder: ``SequenceClassifier`` (docs/classification.md).

    h, _  = encoder.forward(ids, attention_mask)                     (B, T, d)
    z     = mean_pool(h, mask)            pooling="mean" (sentence-transformers)
          = encoder.pool(h) = tanh(pooler.dense(h[:, 0]))   pooling="cls"  (HF BertFor-
                                                              SequenceClassification)
    logits = dropout(z) Wᵀ + b                                       (B, C)
    loss   = mean over the batch of cross-entropy(logits, labels)

``classifier.weight (C, d)`` ~ N(0, 0.02²) and ``classifier.bias`` = 0. The head always trains
(PEFT's ``modules_to_save``): ``freeze()`` — which ``adapters.inject`` calls — freezes the
encoder only. Every op is a forward/backward pair; backward accumulates into ``.grad``.
"""
from __future__ import annotations

from .. import backend
from ..nn.layers import Linear
from ..nn.module import Module
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.cross_entropy import check_targets, cross_entropy_backward, cross_entropy_forward

POOLINGS = ("mean", "cls")
HEAD_STD = 0.02


# --- functional pairs ------------------------------------------------------------------------

def mean_pool_forward(hidden, mask):
    """Mean over the non-pad tokens: ``hidden (B, T, d)``, ``mask (B, T)`` of 0/1 -> ``(B, d)``.

    ``z_b = Σ_t m_bt h_bt / max(Σ_t m_bt, 1e-9)`` (sentence-transformers' clamp)."""
    xp = backend.get_namespace(hidden, mask)
    weights = mask.astype(hidden.dtype)                              # (B, T)
    count = xp.maximum(weights.sum(axis=1, keepdims=True), 1e-9)    # (B, 1)
    weights /= count                                                 # (B, T) m_bt / n_b
    pooled = (hidden * weights[:, :, None]).sum(axis=1)              # (B, d)
    return pooled, weights


def mean_pool_backward(dpooled, weights):
    """``dh_bt = m_bt / n_b · dz_b``: each real token gets its share, pads get 0."""
    return dpooled[:, None, :] * weights[:, :, None]                 # (B, T, d)


# --- the module ------------------------------------------------------------------------------

class SequenceClassifier(Module):
    """``SequenceClassifier(encoder, num_labels, pooling="mean", seed=0, dropout=0.1)``.

    ``encoder`` follows ``lr.models.Bert``'s interface: ``forward(ids, attention_mask=None,
    token_type_ids=None) -> ((B, T, d), cache)``, ``backward(dhidden, cache)``, and for
    ``pooling="cls"`` a ``pooler.dense`` linear. ``dropout`` is the head's (HF: the model's
    hidden dropout, 0.1); it is active in ``train()`` mode only.
    """

    def __init__(self, encoder, num_labels: int, pooling: str = "mean", seed: int = 0,
                 dropout: float = 0.1):
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if pooling == "cls" and getattr(encoder, "pooler", None) is None:
            raise ValueError("pooling='cls' needs an encoder with a pooler (encoder.pool); "
                             "this one has none: use pooling='mean'")
        ref = next(p for _, p in encoder.named_parameters())
        xp, dtype = backend.get_namespace(ref.data), ref.dtype
        d = hidden_size(encoder)
        rng = backend.host_rng(seed)
        self.encoder = encoder
        self.classifier = Linear.from_arrays(
            backend.host_normal(rng, (num_labels, d), HEAD_STD, dtype, xp),   # (C, d)
            xp.zeros((num_labels,), dtype=dtype))
        self.pooling, self.dropout = pooling, float(dropout)
        self._dropout_rng = backend.DeviceRNG(int(rng.integers(2**31)), xp)

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    @property
    def xp(self):
        return backend.get_namespace(self.classifier.weight.data)

    @property
    def dtype(self):
        return self.classifier.weight.dtype

    def freeze(self) -> None:
        """Freeze the encoder; the head stays trainable (it is always trained and saved)."""
        self.encoder.freeze()

    def head_parameters(self):
        return [(f"classifier.{n}", p) for n, p in self.classifier.named_parameters()]

    # --- forward / backward ----------------------------------------------------------------
    def forward(self, ids, attention_mask=None, token_type_ids=None):
        """``ids (B, T)`` int, ``attention_mask (B, T)`` 0/1 -> ``(logits (B, C), cache)``."""
        xp = self.xp
        if attention_mask is None:
            attention_mask = xp.ones(ids.shape, dtype=ids.dtype)
        hidden, c_enc = self.encoder.forward(ids, attention_mask=attention_mask,
                                             token_type_ids=token_type_ids)   # (B, T, d)
        if self.pooling == "mean":
            pooled, c_pool = mean_pool_forward(hidden, attention_mask)        # (B, d)
        else:
            pooled, c_pool = self.encoder.pool(hidden)                        # (B, d)
        dropped, c_drop = dropout_forward(pooled, self.dropout, self._dropout_rng,
                                          self.training)
        logits, c_head = self.classifier.forward(dropped)                    # (B, C)
        return logits, (c_enc, c_pool, c_drop, c_head)

    def backward(self, dlogits, cache) -> None:
        """Accumulate into every trainable parameter; the encoder is not traversed when
        nothing in it trains (head-only training costs one forward)."""
        c_enc, c_pool, c_drop, c_head = cache
        encoder_trains = any(p.trainable for p in self.encoder.parameters())
        dpooled = dropout_backward(self.classifier.backward(dlogits, c_head), c_drop)  # (B, d)
        if not encoder_trains:
            return
        if self.pooling == "mean":
            dhidden = mean_pool_backward(dpooled, c_pool)                     # (B, T, d)
        else:
            dhidden = self.encoder.pool_backward(dpooled, c_pool)             # (B, T, d)
        self.encoder.backward(dhidden, c_enc)

    def loss(self, ids, attention_mask, labels):
        """``(mean cross-entropy: float, cache)`` of ``labels (B,)`` (the trainer's batch
        contract: a ``TextBatch``'s ``args``)."""
        logits, cache = self.forward(ids, attention_mask=attention_mask)
        check_targets(labels, self.num_labels, "labels")
        loss, c_ce = cross_entropy_forward(logits, labels)
        return loss, (cache, c_ce)

    def loss_backward(self, cache, dloss: float = 1.0) -> None:
        model_cache, c_ce = cache
        self.backward(cross_entropy_backward(c_ce, dloss), model_cache)

    def predict_proba(self, ids, attention_mask=None):
        """Softmax probabilities ``(B, C)`` (call ``eval()`` first to switch dropout off)."""
        logits, _ = self.forward(ids, attention_mask=attention_mask)
        logits = logits - logits.max(axis=-1, keepdims=True)
        probs = self.xp.exp(logits)
        return probs / probs.sum(axis=-1, keepdims=True)


def hidden_size(encoder) -> int:
    """``d`` of the encoder's hidden states (its config's hidden_size / d_model, else the
    width of its first embedding)."""
    config = getattr(encoder, "config", None)
    for field in ("hidden_size", "d_model"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value
    name, p = next(encoder.named_parameters())
    if len(p.shape) != 2:
        raise ValueError(f"cannot tell the encoder's hidden size (first parameter {name!r} "
                         f"has shape {tuple(p.shape)}); give it a config.hidden_size")
    return int(p.shape[1])

