"""BERT encoder (docs/pretrained.md#bert): embeddings plus post-LayerNorm bidirectional blocks.

    x = LN(word[ids] + position[:T] + token_type[types])                  (B, T, d)
    x = layer[i](x, key_mask)    h = LN(x + attn(x)),  y = LN(h + mlp_erf(h))
    pooled = tanh(x[:, 0] Wpᵀ + bp)                                        (B, d), optional

Parameter names are the Hugging Face checkpoint's own without the ``bert.`` prefix
(``embeddings.word_embeddings.weight``, ``encoder.layer.0.attention.self.query.weight``,
``encoder.layer.0.attention.output.dense.weight``, ``encoder.layer.0.intermediate.dense.weight``,
``encoder.layer.0.output.dense.weight``, ``pooler.dense.weight``, ...), so PEFT target names
(``query``, ``value``, ``dense``) mean the same modules in both libraries. Dropout is off
unless ``set_dropout(p)`` turns on BERT's hidden dropout (after the embeddings' LayerNorm and
on each attention and MLP output before its residual) and its attention-probability dropout,
and then only in ``train()`` mode (docs/classification.md#dropout).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import backend
from ..nn.module import Module
from ..ops.cross_entropy import check_targets
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.tanh import tanh_backward, tanh_forward
from .blocks import Block, Embedding, HostInit, PackedRows, Parts, any_trainable, check_eps

GELU_OF_ACT = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooler: bool = True
    pad_token_id: int | None = 0     # its word-embedding row never receives a gradient

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        check_eps(self.layer_norm_eps)
        if self.hidden_act not in GELU_OF_ACT:
            raise ValueError(f"hidden_act must be one of {sorted(GELU_OF_ACT)}, "
                             f"got {self.hidden_act!r}")
        if self.pad_token_id is not None and (
                isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int)
                or not 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"pad_token_id must be None or an integer in [0, vocab_size), "
                             f"got {self.pad_token_id!r}")
        if not isinstance(self.pooler, bool):
            raise ValueError(f"pooler must be a bool, got {self.pooler!r}")

    def to_dict(self) -> dict:
        return {"model_type": "bert", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "BertConfig":
        data = dict(data)
        data.pop("model_type", None)
        return cls(**data)


class Group(Module):
    """A named bag of sub-modules (e.g. ``attention.output`` holding ``dense`` and
    ``LayerNorm``): it exists only so parameter names match the checkpoint's."""

    def __init__(self, /, **children):   # positional-only: a child may be called "self"
        for name, child in children.items():
            setattr(self, name, child)


class BertLayer(Block):
    """Post-LayerNorm bidirectional block with BERT's names."""

    def __init__(self, attention: Group, intermediate: Group, output: Group, n_head: int,
                 gelu: str):
        super().__init__(n_head, causal=False, pre_ln=False, gelu=gelu)
        self.attention, self.intermediate, self.output = attention, intermediate, output

    def parts(self) -> Parts:
        sa, ao = self.attention.self, self.attention.output
        return Parts(ao.LayerNorm, sa.query, sa.key, sa.value, ao.dense,
                     self.output.LayerNorm, self.intermediate.dense, self.output.dense)

    # hidden dropout on each branch's output, before its residual (set by Bert.set_dropout)
    dropout, dropout_rng = 0.0, None

    def _attn_forward(self, p: Parts, x, key_mask, rows=None):
        out, cache = super()._attn_forward(p, x, key_mask, rows)
        out, mask = dropout_forward(out, self.dropout, self.dropout_rng, self.training)
        return out, (cache, mask)

    def _attn_backward(self, p: Parts, dout, c, need_dx: bool):
        cache, mask = c
        return super()._attn_backward(p, dropout_backward(dout, mask), cache, need_dx)

    def _mlp_forward(self, p: Parts, x):
        out, cache = super()._mlp_forward(p, x)
        out, mask = dropout_forward(out, self.dropout, self.dropout_rng, self.training)
        return out, (cache, mask)

    def _mlp_backward(self, p: Parts, dout, c):
        cache, mask = c
        return super()._mlp_backward(p, dropout_backward(dout, mask), cache)


class Bert(Module):
    """``Bert(config, seed=0, dtype="float32", xp=None)``: random N(0, 0.02²) init drawn on the
    host (``lr.from_pretrained`` then assigns a checkpoint's numbers)."""

    def __init__(self, config: BertConfig, seed=0, dtype=backend.DEFAULT_DTYPE, xp=None):
        if not isinstance(config, BertConfig):
            raise ValueError(f"config must be a BertConfig, got {type(config).__name__}")
        self.config = config
        init = HostInit(seed, dtype, xp)
        d, d_ff = config.hidden_size, config.intermediate_size
        normal, dense = init.normal, init.linear

        def layernorm():
            return init.layernorm(d, config.layer_norm_eps)

        gelu = GELU_OF_ACT[config.hidden_act]
        self.embeddings = Group(
            word_embeddings=Embedding(normal((config.vocab_size, d)), config.pad_token_id),
            position_embeddings=Embedding(normal((config.max_position_embeddings, d))),
            token_type_embeddings=Embedding(normal((config.type_vocab_size, d))),
            LayerNorm=layernorm())
        self.encoder = Group(layer=[
            BertLayer(Group(self=Group(query=dense(d, d), key=dense(d, d), value=dense(d, d)),
                            output=Group(dense=dense(d, d), LayerNorm=layernorm())),
                      Group(dense=dense(d, d_ff)),
                      Group(dense=dense(d_ff, d), LayerNorm=layernorm()),
                      config.num_attention_heads, gelu)
            for _ in range(config.num_hidden_layers)])
        if config.pooler:
            self.pooler = Group(dense=dense(d, d))

    dropout, dropout_rng = 0.0, None
    # run the blocks on the real tokens only (docs/performance.md#unpadding); False computes
    # every padded row too, as transformers does
    pack_tokens = True

    def set_dropout(self, p: float, seed: int = 0, attention: float | None = None) -> None:
        """BERT's hidden dropout (``hidden_dropout_prob``) and attention-probability dropout
        (``attention_probs_dropout_prob``, ``attention``; default ``p``, as BERT's configs
        have both 0.1), active in ``train()`` mode; each layer draws its masks from its own
        seeded streams."""
        attention = p if attention is None else attention
        for name, value in (("dropout", p), ("attention", attention)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        rng = backend.host_rng(seed)
        self.dropout = float(p)
        self.dropout_rng = backend.DeviceRNG(int(rng.integers(2**31)), self.xp)
        for layer in self.encoder.layer:
            layer.dropout = float(p)
            layer.dropout_rng = backend.DeviceRNG(int(rng.integers(2**31)), self.xp)
        for layer in self.encoder.layer:
            layer.attention_dropout = float(attention)
            layer.attention_rng = backend.DeviceRNG(int(rng.integers(2**31)), self.xp)

    @property
    def dtype(self):
        return self.embeddings.word_embeddings.weight.dtype

    @property
    def xp(self):
        return backend.get_namespace(self.embeddings.word_embeddings.weight.data)

    def _check_ids(self, ids, name, size, shape=None):
        backend.get_namespace(ids, self.embeddings.word_embeddings.weight.data)   # same backend
        if getattr(ids, "ndim", None) != 2 or 0 in ids.shape:
            raise ValueError(f"{name} must be a non-empty 2-D (B, T) array, "
                             f"got shape {getattr(ids, 'shape', None)}")
        if shape is not None and tuple(ids.shape) != shape:
            raise ValueError(f"{name} must have the shape of ids {shape}, got {tuple(ids.shape)}")
        check_targets(ids, size, name)

    # --- forward / backward ----------------------------------------------------------------------
    def forward(self, ids, attention_mask=None, token_type_ids=None):
        """``ids (B, T)`` int, ``attention_mask (B, T)`` (1 token, 0 padding; default all 1),
        ``token_type_ids (B, T)`` (default 0) -> ``(last hidden state (B, T, d), cache)``.
        Padded keys get no attention weight. With ``pack_tokens`` (the default) padded
        positions are not computed at all: their rows of the result are zero."""
        cfg, emb = self.config, self.embeddings
        self._check_ids(ids, "ids", cfg.vocab_size)
        B, T = ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length T={T} exceeds max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        if attention_mask is not None:
            self._check_ids(attention_mask, "attention_mask", 2, (B, T))
        if token_type_ids is None:
            token_type_ids = self.xp.zeros((B, T), dtype=ids.dtype)
        self._check_ids(token_type_ids, "token_type_ids", cfg.type_vocab_size, (B, T))
        x, c_word = emb.word_embeddings.forward(ids)                  # (B, T, d)
        x += emb.position_embeddings.weight.data[:T]                  # (T, d) broadcast over B
        types, c_type = emb.token_type_embeddings.forward(token_type_ids)   # (B, T, d)
        x += types
        rows = self._real_rows(attention_mask)
        if rows is not None:
            x = rows.pack(x)                                          # (N, d) real tokens
        x, c_ln = emb.LayerNorm.forward(x)                            # (B, T, d) or (N, d)
        x, c_drop = dropout_forward(x, self.dropout, self.dropout_rng, self.training)
        c_layers = []
        for layer in self.encoder.layer:
            x, c = layer.forward(x, key_mask=attention_mask, rows=rows)
            c_layers.append(c)
        if rows is not None:
            x = rows.unpack(x)                                        # (B, T, d), padded 0
        return x, (c_word, c_type, (c_ln, c_drop), T, c_layers, rows)

    def _real_rows(self, attention_mask):
        """``PackedRows`` of the unpadded tokens, or None (no mask, no padding, or none
        real): the blocks then run every row (docs/performance.md#unpadding)."""
        if attention_mask is None or not self.pack_tokens:
            return None
        B, T = attention_mask.shape
        index = self.xp.flatnonzero(attention_mask.reshape(-1))       # (N,) b·T + t
        if index.shape[0] in (0, B * T):
            return None
        starts = None
        if backend.backend_of(attention_mask) == "numpy":   # host ints: attention per sequence
            lengths = (attention_mask != 0).sum(axis=1)                # (B,)
            starts = [0, *self.xp.cumsum(lengths).tolist()]
        return PackedRows(index, B, T, starts)

    def backward(self, dhidden, cache) -> None:
        """Accumulate ``dL/dθ`` for every trainable θ given ``dhidden (B, T, d)``; stops as
        soon as nothing further down trains."""
        c_word, c_type, c_ln, T, c_layers, rows = cache
        emb, layers = self.embeddings, self.encoder.layer
        needed, acc = [], any_trainable(emb)   # needed[i]: embeddings or layers[:i+1] train
        for layer in layers:
            acc = acc or any_trainable(layer)
            needed.append(acc)
        dx = dhidden if rows is None else rows.pack(dhidden)           # (N, d): padded rows
        for i in reversed(range(len(layers))):                        # are constant zeros
            if not needed[i]:
                return
            below = needed[i - 1] if i > 0 else any_trainable(emb)
            dx = layers[i].backward(dx, c_layers[i], need_dx=below)
        if not any_trainable(emb):
            return
        c_ln, c_drop = c_ln
        dx = emb.LayerNorm.backward(dropout_backward(dx, c_drop), c_ln)   # (B, T, d) or (N, d)
        if rows is not None:
            dx = rows.unpack(dx)                                      # (B, T, d)
        positions = emb.position_embeddings.weight
        if positions.trainable:
            dpos = self.xp.zeros(positions.shape, dtype=dx.dtype)      # (P, d)
            dpos[:T] = dx.sum(axis=0)                                  # positions 0..T-1
            positions.accumulate(dpos)
        emb.token_type_embeddings.backward(dx, c_type)
        emb.word_embeddings.backward(dx, c_word)

    # --- pooler (docs/pretrained.md#pooler) ------------------------------------------------------
    def pool(self, hidden):
        """``tanh(hidden[:, 0] Wpᵀ + bp)`` -> ``(pooled (B, d), cache)``."""
        if not self.config.pooler:
            raise ValueError("this Bert has no pooler (config.pooler is False)")
        B, T, d = hidden.shape
        y, c_dense = self.pooler.dense.forward(hidden[:, 0])          # (B, d)
        pooled, c_tanh = tanh_forward(y)
        return pooled, (c_dense, c_tanh, T)

    def pool_backward(self, dpooled, cache):
        """``dhidden (B, T, d)`` (zero except at position 0) for ``dpooled (B, d)``."""
        c_dense, c_tanh, T = cache
        dfirst = self.pooler.dense.backward(tanh_backward(dpooled, c_tanh), c_dense)   # (B, d)
        B, d = dfirst.shape
        dhidden = self.xp.zeros((B, T, d), dtype=dfirst.dtype)
        dhidden[:, 0] = dfirst
        return dhidden
