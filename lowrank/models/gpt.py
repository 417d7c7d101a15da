"""The mini GPT (docs/models.md#gpt): pre-LayerNorm transformer with every backward written by hand.

    x = tok_emb[idx] + pos_emb[:T]                       (B, T, d)
    x = blocks[i](x)       for i in 0..L-1
    logits = ln_f(x) @ W_headᵀ                           (B, T, V)

with ``W_head = tok_emb.weight`` when the embeddings are tied, else ``lm_head.weight``.

``named_parameters()`` gives exactly the names of docs/models.md#gpt (tok_emb.weight,
pos_emb.weight, blocks.{i}.ln1.weight, blocks.{i}.attn.q.weight, ..., ln_f.bias[, lm_head.weight]).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .. import backend
from ..nn.layers import Linear
from ..nn.module import Module, Parameter
from ..ops.cross_entropy import check_targets, cross_entropy_backward, cross_entropy_forward
from ..ops.layernorm import EPS
from ..ops.linear import linear_backward, linear_forward
from .blocks import INIT_STD as _INIT_STD
from .blocks import (MLP, CausalSelfAttention, Embedding, GPTBlock, HostInit, any_trainable,
                     check_eps)



@dataclass
class GPTConfig:
    vocab_size: int
    context: int
    n_layer: int
    n_head: int
    d_model: int
    tie_embeddings: bool = True
    layer_norm_eps: float = EPS

    def __post_init__(self):
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by "
                             f"n_head ({self.n_head})")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        check_eps(self.layer_norm_eps)

    def to_dict(self) -> dict:
        """The fields; ``layer_norm_eps`` only when it is not the default, so checkpoints of
        lowrank's own GPT keep the exact config they always had."""
        data = asdict(self)
        if data["layer_norm_eps"] == EPS:
            del data["layer_norm_eps"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        return cls(**data)


class GPT(Module):
    """``GPT(config, seed=0, dtype="float32", xp=None)``; GPT-2 init (N(0, 0.02²), zero biases,
    residual projections o and fc2 scaled by 1/√(2L)), drawn on the host so every backend
    starts bit-identical."""

    def __init__(self, config: GPTConfig, seed=0, dtype=backend.DEFAULT_DTYPE, xp=None):
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        init = HostInit(seed, dtype, xp)
        V, C, d = config.vocab_size, config.context, config.d_model
        normal, linear = init.normal, init.linear

        def layernorm():
            return init.layernorm(d, config.layer_norm_eps)

        resid_std = _INIT_STD / math.sqrt(2 * config.n_layer)
        # attribute order is parameter-name order
        self.tok_emb = Embedding(normal((V, d)))
        self.pos_emb = Embedding(normal((C, d)))
        self.blocks = [
            GPTBlock(layernorm(),
                  CausalSelfAttention(linear(d, d), linear(d, d), linear(d, d),
                                      linear(d, d, resid_std), config.n_head),
                  layernorm(),
                  MLP(linear(d, 4 * d), linear(4 * d, d, resid_std)))
            for _ in range(config.n_layer)]
        self.ln_f = layernorm()
        if not config.tie_embeddings:
            self.lm_head = Linear.from_arrays(normal((V, d)))   # no bias: "lm_head.weight"

    # --- helpers -------------------------------------------------------------------------------
    @property
    def head_weight(self) -> Parameter:
        return self.tok_emb.weight if self.config.tie_embeddings else self.lm_head.weight

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype

    @property
    def xp(self):
        return backend.get_namespace(self.tok_emb.weight.data)

    def check_idx(self, idx, name: str = "idx"):
        """``(B, T)`` integer token ids on the model's backend, T <= context, ids < vocab."""
        backend.get_namespace(idx, self.tok_emb.weight.data)   # raises on mixed backends
        if getattr(idx, "ndim", None) != 2:
            raise ValueError(f"{name} must be a 2-D (B, T) array, "
                             f"got shape {getattr(idx, 'shape', None)}")
        B, T = idx.shape
        if B < 1 or T < 1:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(idx.shape)}")
        if T > self.config.context:
            raise ValueError(f"sequence length T={T} exceeds the context ({self.config.context})")
        check_targets(idx, self.config.vocab_size, name)
        return B, T

    # --- forward / backward ----------------------------------------------------------------------
    def forward(self, idx):
        """``idx (B, T)`` int -> ``(logits (B, T, V), cache)``."""
        B, T = self.check_idx(idx)
        x, c_tok = self.tok_emb.forward(idx)                   # (B, T, d)
        x += self.pos_emb.weight.data[:T]                      # (T, d) broadcast over B
        c_blocks = []
        for block in self.blocks:
            x, c = block.forward(x)
            c_blocks.append(c)
        h, c_lnf = self.ln_f.forward(x)                        # (B, T, d)
        d = h.shape[-1]
        logits, c_head = linear_forward(h.reshape(B * T, d), self.head_weight.data)   # (N, V)
        return logits.reshape(B, T, -1), (c_tok, T, c_blocks, c_lnf, c_head)

    def backward(self, dlogits, cache) -> None:
        """Accumulate ``dL/dθ`` for every trainable θ given ``dlogits (B, T, V)``.

        Backward stops as soon as nothing further down is trainable: with a frozen trunk
        (e.g. only ln_f trained) the blocks are never traversed."""
        c_tok, T, c_blocks, c_lnf, c_head = cache
        # needed[i]: some parameter in the embeddings or blocks[:i+1] trains
        needed, acc = [], any_trainable(self.tok_emb, self.pos_emb)
        for block in self.blocks:
            acc = acc or any_trainable(block)
            needed.append(acc)
        W = self.head_weight
        B, _, V = dlogits.shape
        dlogits = dlogits.reshape(-1, V)                       # (N, V)
        if not (needed[-1] or any_trainable(self.ln_f)):    # only the head (if anything) trains
            if W.trainable:
                W.accumulate(dlogits.T @ c_head)               # (V, d)
            return
        dh, dW, _ = linear_backward(dlogits, c_head, W.data, need_dweight=W.trainable,
                                    need_dbias=False)          # dh (N, d), dW (V, d)
        if dW is not None:
            W.accumulate(dW)
        dx = self.ln_f.backward(dh.reshape(B, T, -1), c_lnf)   # (B, T, d)
        embeddings_train = any_trainable(self.tok_emb, self.pos_emb)
        for i in reversed(range(len(self.blocks))):
            if not needed[i]:
                return
            below = needed[i - 1] if i > 0 else embeddings_train   # does anything below train?
            dx = self.blocks[i].backward(dx, c_blocks[i], need_dx=below)
        if not embeddings_train:
            return
        if self.pos_emb.weight.trainable:
            dpos = self.xp.zeros(self.pos_emb.weight.shape, dtype=dx.dtype)   # (C, d)
            dpos[:T] = dx.sum(axis=0)                          # positions are 0..T-1 in every row
            self.pos_emb.weight.accumulate(dpos)
        self.tok_emb.backward(dx, c_tok)

    def new_kv_cache(self, batch: int):
        """Empty key/value buffers for ``forward_cached``: per block ``(K, V)``, each
        ``(batch, H, context, hs)`` (docs/performance.md#kv-cache)."""
        cfg, xp = self.config, self.xp
        shape = (batch, cfg.n_head, cfg.context, cfg.d_model // cfg.n_head)
        return [(xp.zeros(shape, dtype=self.dtype), xp.zeros(shape, dtype=self.dtype))
                for _ in self.blocks]

    def forward_cached(self, idx, kv, past: int, last_only: bool = False):
        """Inference for generation: ``idx (B, t)`` are positions ``past .. past+t-1`` of
        sequences whose earlier keys and values are in ``kv`` (``new_kv_cache``); returns
        their ``logits (B, t, V)`` (``(B, 1, V)``, the last position's, with ``last_only``)
        and writes their keys and values into ``kv``."""
        B, t = self.check_idx(idx)
        if past + t > self.config.context:
            raise ValueError(f"positions up to {past + t} exceed the context "
                             f"({self.config.context})")
        x, _ = self.tok_emb.forward(idx)                       # (B, t, d)
        x += self.pos_emb.weight.data[past:past + t]           # (t, d) broadcast over B
        for block, layer_kv in zip(self.blocks, kv):
            x = block.forward_cached(x, layer_kv, past)
        if last_only:
            x, t = x[:, -1:], 1                                # (B, 1, d)
        h, _ = self.ln_f.forward(x)                            # (B, t, d)
        logits, _ = linear_forward(h.reshape(B * t, -1), self.head_weight.data)   # (N, V)
        return logits.reshape(B, t, -1)

    def loss(self, idx, targets):
        """``(mean cross-entropy: float, cache)`` for next-token ``targets (B, T)``."""
        logits, cache = self.forward(idx)
        loss, c_ce = cross_entropy_forward(logits, targets)
        return loss, (cache, c_ce)

    def loss_backward(self, cache, dloss: float = 1.0) -> None:
        model_cache, c_ce = cache
        self.backward(cross_entropy_backward(c_ce, dloss), model_cache)
