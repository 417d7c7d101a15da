"""The Llama family decoder (docs/llama.md): Llama, Qwen2 (biases on q/k/v), Mistral.

    x = embed_tokens[ids]                                                (B, T, d)
    per layer:  h = x + o_proj(GQA(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),  n = RMSNorm₁(x)
                x = h + down_proj(SiLU(gate_proj(m)) ⊙ up_proj(m)),                m = RMSNorm₂(h)
    hidden = norm(x);   logits = hidden W_headᵀ   (W_head = embed_tokens.weight when tied)

Parameter names are the checkpoint's (``model.layers.0.self_attn.q_proj.weight``, ...,
``lm_head.weight`` only when untied), so PEFT targets (``q_proj``, ``down_proj``, ...) mean the
same modules in both libraries. ``forward(ids, logits=False)`` stops at the final norm's
hidden states; ``head_forward`` / ``head_backward`` then apply the head to chosen rows only.
"""
from __future__ import annotations

from .. import backend
from ..nn.layers import Linear
from ..nn.module import Module, Parameter
from ..ops.cross_entropy import check_targets, cross_entropy_backward, cross_entropy_forward
from ..ops.gqa import gqa_backward, gqa_cached, gqa_forward
from ..ops.linear import linear_backward, linear_forward, weight_operand
from ..ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from ..ops.rope import inv_freq, rope_backward, rope_forward, rope_tables
from ..ops.swiglu import swiglu_backward, swiglu_forward
from .blocks import Embedding, HostInit, any_trainable
from .labelled_loss import labelled_loss_backward, labelled_loss_forward
from .llama_config import LlamaConfig


class RMSNorm(Module):
    def __init__(self, weight, eps: float):
        self.weight = Parameter(weight)   # (d,) ones
        self.eps = float(eps)

    def forward(self, x):
        return rmsnorm_forward(x, self.weight.data, self.eps)

    def backward(self, dy, cache):
        dx, dw = rmsnorm_backward(dy, cache, need_dweight=self.weight.trainable)
        if dw is not None:
            self.weight.accumulate(dw)
        return dx


class LlamaAttention(Module):
    def __init__(self, q_proj, k_proj, v_proj, o_proj):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj


class LlamaMLP(Module):
    def __init__(self, gate_proj, up_proj, down_proj):
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class LlamaLayer(Module):
    """One decoder layer; the projections are looked up at call time (inject may swap any)."""

    def __init__(self, self_attn, mlp, input_layernorm, post_attention_layernorm,
                 n_head: int, n_kv: int, head_dim: int):
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.n_head, self.n_kv, self.head_dim = n_head, n_kv, head_dim

    def _qkv(self, n2, B: int, T: int, rope):
        """Projections of the normed rows ``n2 (N, d)``, q and k rotated."""
        a, hs = self.self_attn, self.head_dim
        q, cq = a.q_proj.forward(n2)                        # (N, H·hs)
        k, ck = a.k_proj.forward(n2)                        # (N, Hkv·hs)
        v, cv = a.v_proj.forward(n2)
        q, cr = rope_forward(q.reshape(B, T, self.n_head, hs), *rope)   # (B, T, H, hs)
        k, _ = rope_forward(k.reshape(B, T, self.n_kv, hs), *rope)      # (B, T, Hkv, hs)
        return q, k, v.reshape(B, T, self.n_kv, hs), (cq, ck, cv, cr)

    def _mlp_forward(self, x):
        m = self.mlp
        B, T, d = x.shape
        n, c_norm = self.post_attention_layernorm.forward(x)
        n2 = n.reshape(B * T, d)                            # (N, d)
        g, cg = m.gate_proj.forward(n2)                     # (N, f)
        u, cu = m.up_proj.forward(n2)
        s, cs = swiglu_forward(g, u)
        out, cd = m.down_proj.forward(s)                    # (N, d)
        return out.reshape(B, T, d), (c_norm, cg, cu, cs, cd)

    def forward(self, x, rope, key_mask=None):
        """``x (B, T, d)``, ``rope = (cos, sin)`` -> ``(y, cache)``."""
        B, T, d = x.shape
        n, c_norm = self.input_layernorm.forward(x)
        q, k, v, c_proj = self._qkv(n.reshape(B * T, d), B, T, rope)
        y, c_att = gqa_forward(q, k, v, key_mask)           # (B, T, H·hs)
        a, c_o = self.self_attn.o_proj.forward(y.reshape(B * T, -1))   # (N, d)
        h = x + a.reshape(B, T, d)
        out, c_mlp = self._mlp_forward(h)
        out += h
        return out, (c_norm, c_proj, c_att, c_o, c_mlp)

    def backward(self, dout, cache, need_dx: bool = True):
        """``dx`` (or ``None`` with ``need_dx=False``: nothing below this layer trains)."""
        c_norm, (cq, ck, cv, cr), c_att, c_o, (c_norm2, cg, cu, cs, cd) = cache
        a, m = self.self_attn, self.mlp
        B, T, d = dout.shape
        N = B * T
        ds = m.down_proj.backward(dout.reshape(N, d), cd)   # (N, f)
        dg, du = swiglu_backward(ds, cs)
        dn = m.gate_proj.backward(dg, cg)                   # (N, d)
        dn += m.up_proj.backward(du, cu)
        dh = self.post_attention_layernorm.backward(dn.reshape(B, T, d), c_norm2)
        dh += dout                                          # the residual
        attn_trains = any_trainable(a, self.input_layernorm)
        if not (need_dx or attn_trains):
            return None
        dy = a.o_proj.backward(dh.reshape(N, d), c_o, need_dx=True)    # (N, H·hs)
        dq, dk, dv = gqa_backward(dy.reshape(B, T, -1), c_att)
        dq = rope_backward(dq, cr).reshape(N, -1)           # (N, H·hs)
        dk = rope_backward(dk, cr).reshape(N, -1)           # (N, Hkv·hs)
        need_n = need_dx or any_trainable(self.input_layernorm)
        grads = [p.backward(g, c, need_dx=need_n)
                 for p, g, c in ((a.q_proj, dq, cq), (a.k_proj, dk, ck),
                                 (a.v_proj, dv.reshape(N, -1), cv))]
        if not need_n:
            return None
        dn = grads[0]
        dn += grads[1]
        dn += grads[2]
        dx = self.input_layernorm.backward(dn.reshape(B, T, d), c_norm)
        if not need_dx:
            return None
        dx += dh
        return dx

    def forward_cached(self, x, rope, kv, past: int, key_mask=None):
        """Inference: ``x (B, t, d)`` at positions ``past ..``; keys and values into ``kv``."""
        B, t, d = x.shape
        n, _ = self.input_layernorm.forward(x)
        q, k, v, _ = self._qkv(n.reshape(B * t, d), B, t, rope)
        y = gqa_cached(q, k, v, kv, past, key_mask)         # (B, t, H·hs)
        h = x + self.self_attn.o_proj.forward(y.reshape(B * t, -1))[0].reshape(B, t, d)
        out, _ = self._mlp_forward(h)
        out += h
        return out


class LlamaModel(Module):
    """The trunk under its checkpoint name ``model``."""

    def __init__(self, embed_tokens, layers, norm):
        self.embed_tokens, self.layers, self.norm = embed_tokens, layers, norm


class Llama(Module):
    """``Llama(config, seed=0, dtype="float32", xp=None)``: N(0, 0.02²) weights, zero biases,
    unit norms, drawn on the host (``lr.from_pretrained`` then assigns a checkpoint's)."""

    peft_task_type = "CAUSAL_LM"   # what PEFT adapter files saved from it declare

    def __init__(self, config: LlamaConfig, seed=0, dtype=backend.DEFAULT_DTYPE, xp=None):
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = c = config
        init = HostInit(seed, dtype, xp)
        d, hs, f = c.hidden_size, c.head_dim, c.intermediate_size
        H, Hkv = c.num_attention_heads, c.num_key_value_heads

        def linear(n_in, n_out, bias=False):
            return Linear.from_arrays(init.normal((n_out, n_in)),
                                      init.xp.zeros((n_out,), dtype=init.dtype) if bias else None)

        def norm():
            return RMSNorm(init.xp.ones((d,), dtype=init.dtype), c.rms_norm_eps)

        qkv_bias = c.attention_bias
        layers = [LlamaLayer(LlamaAttention(linear(d, H * hs, qkv_bias),
                                            linear(d, Hkv * hs, qkv_bias),
                                            linear(d, Hkv * hs, qkv_bias), linear(H * hs, d)),
                             LlamaMLP(linear(d, f), linear(d, f), linear(f, d)),
                             norm(), norm(), H, Hkv, hs)
                  for _ in range(c.num_hidden_layers)]
        self.model = LlamaModel(Embedding(init.normal((c.vocab_size, d))), layers, norm())
        if not c.tie_word_embeddings:
            self.lm_head = linear(d, c.vocab_size)          # no bias: "lm_head.weight"
        self.rope_freq = backend.asarray(                   # (hs/2,) float64, a constant
            inv_freq(hs, c.rope_theta, c.rope_type, c.rope_scaling), xp=init.xp)

    # --- helpers -------------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def xp(self):
        return backend.get_namespace(self.model.embed_tokens.weight.data)

    def _check_ids(self, ids, name, size, shape=None):
        backend.get_namespace(ids, self.model.embed_tokens.weight.data)   # same backend
        if getattr(ids, "ndim", None) != 2 or 0 in ids.shape:
            raise ValueError(f"{name} must be a non-empty 2-D (B, T) array, "
                             f"got shape {getattr(ids, 'shape', None)}")
        if shape is not None and tuple(ids.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(ids.shape)}")
        check_targets(ids, size, name)

    def _check_mask(self, mask, shape):
        """``None`` or a ``shape`` array of 0/1 (bools become 0/1 integers)."""
        if mask is None:
            return None
        if getattr(mask, "dtype", None) is not None and mask.dtype.kind == "b":
            mask = mask.astype(self.xp.int8)
        self._check_ids(mask, "attention_mask", 2, shape)
        return mask

    def _rope(self, B: int, T: int, past: int, position_ids):
        """``(cos, sin)`` for positions ``past .. past+T-1`` (or ``position_ids (B, T)``)."""
        if position_ids is None:
            position_ids = self.xp.broadcast_to(self.xp.arange(past, past + T)[None, :], (B, T))
        else:
            self._check_ids(position_ids, "position_ids", self.config.max_position_embeddings,
                            (B, T))
        # the tables are formed in the model's dtype (a float32 model's as transformers
        # forms them, docs/llama.md#rope), whatever dtype it was built in
        return rope_tables(self.rope_freq.astype(self.dtype), position_ids, self.dtype)

    # --- forward / backward ----------------------------------------------------------------------
    def forward(self, ids, attention_mask=None, position_ids=None, logits: bool = True,
                keep_cache: bool = True):
        """``ids (B, T)`` int, ``attention_mask (B, T)`` (1 token, 0 padding; padded keys get
        no weight), ``position_ids (B, T)`` (default 0..T-1, as transformers without a
        cache) -> ``(logits (B, T, V), cache)``, or ``(hidden (B, T, d), cache)`` after the
        final norm with ``logits=False`` (then ``head_forward`` on the rows wanted).
        ``keep_cache=False`` (scoring): each layer's cache is dropped as soon as the next
        layer runs, so a whole batch's activations are never held; the cache is ``None``."""
        cfg = self.config
        self._check_ids(ids, "ids", cfg.vocab_size)
        B, T = ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length T={T} exceeds max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        attention_mask = self._check_mask(attention_mask, (B, T))
        rope = self._rope(B, T, 0, position_ids)
        x, c_emb = self.model.embed_tokens.forward(ids)     # (B, T, d)
        c_layers = []
        for layer in self.model.layers:
            x, c = layer.forward(x, rope, attention_mask)
            if keep_cache:
                c_layers.append(c)
        c = None                                            # scoring: drop the last layer's too
        h, c_norm = self.model.norm.forward(x)              # (B, T, d)
        if not keep_cache:
            return (self.head_forward(h)[0] if logits else h), None
        if not logits:
            return h, (c_emb, c_layers, c_norm, None)
        out, c_head = self.head_forward(h)
        return out, (c_emb, c_layers, c_norm, c_head)

    @property
    def head_weight(self) -> Parameter:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings \
            else self.lm_head.weight

    def head_forward(self, hidden):
        """``hidden (..., d)`` -> ``(logits (..., V), cache)``."""
        if self.config.tie_word_embeddings:
            return linear_forward(hidden, weight_operand(self.head_weight))
        return self.lm_head.forward(hidden)

    def head_backward(self, dlogits, cache, need_dx: bool = True):
        """``dhidden (..., d)`` (``None`` with ``need_dx=False``); the head's gradient when
        it trains."""
        if not self.config.tie_word_embeddings:
            return self.lm_head.backward(dlogits, cache, need_dx=need_dx)
        W = self.head_weight
        dx, dW, _ = linear_backward(dlogits, cache, weight_operand(W), need_dweight=W.trainable,
                                    need_dbias=False, need_dx=need_dx)
        if dW is not None:
            W.accumulate(dW)
        return dx

    def backward(self, dout, cache) -> None:
        """Accumulate ``dL/dθ`` for every trainable θ given the gradient of forward's output
        (``dlogits``, or ``dhidden`` when forward ran with ``logits=False``); stops as soon
        as nothing further down trains."""
        c_emb, c_layers, c_norm, c_head = cache
        emb, layers = self.model.embed_tokens, self.model.layers
        needed, acc = [], any_trainable(emb)   # needed[i]: embedding or layers[:i+1] train
        for layer in layers:
            acc = acc or any_trainable(layer)
            needed.append(acc)
        trunk = needed[-1] or any_trainable(self.model.norm)
        dh = dout if c_head is None else self.head_backward(dout, c_head, need_dx=trunk)
        if not trunk:
            return
        dx = self.model.norm.backward(dh, c_norm)           # (B, T, d)
        for i in reversed(range(len(layers))):
            if not needed[i]:
                return
            below = needed[i - 1] if i > 0 else any_trainable(emb)
            dx = layers[i].backward(dx, c_layers[i], need_dx=below)
        if any_trainable(emb):
            emb.backward(dx, c_emb)

    def loss(self, ids, targets, attention_mask=None):
        """``(mean cross-entropy: float, cache)`` for ``targets (B, T)`` (the trainer's
        interface, as the GPT's). A negative target (``labelled_loss.IGNORE``) is ignored:
        then the head runs only on the labelled rows (docs/chat.md#loss)."""
        if getattr(targets, "size", 0) and int(targets.min()) < 0:
            return labelled_loss_forward(self, ids, targets, attention_mask)
        logits, cache = self.forward(ids, attention_mask)
        loss, c_ce = cross_entropy_forward(logits, targets)
        return loss, (cache, c_ce)

    def loss_backward(self, cache, dloss: float = 1.0) -> None:
        if len(cache) != 2:
            return labelled_loss_backward(self, cache, dloss)
        model_cache, c_ce = cache
        self.backward(cross_entropy_backward(c_ce, dloss), model_cache)

    # --- generation with a KV cache (docs/llama.md#kv-cache) -------------------------------
    def new_kv_cache(self, batch: int, length: int | None = None):
        """Empty ``(K, V)`` per layer, each ``(batch, Hkv, length, hs)`` (one head per group;
        default length: max_position_embeddings)."""
        cfg, xp = self.config, self.xp
        length = cfg.max_position_embeddings if length is None else int(length)
        shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
        return [(xp.zeros(shape, dtype=self.dtype), xp.zeros(shape, dtype=self.dtype))
                for _ in self.model.layers]

    def forward_cached(self, ids, kv, past: int, attention_mask=None, position_ids=None,
                       last_only: bool = False):
        """Inference: ``ids (B, t)`` are positions ``past .. past+t-1`` (or ``position_ids``)
        of sequences whose earlier keys and values are in ``kv``; ``attention_mask
        (B, past+t)`` marks padded keys. Returns ``logits (B, t, V)`` (``(B, 1, V)`` of the
        last position with ``last_only``: a prompt's other rows need no head); writes ``kv``."""
        cfg = self.config
        self._check_ids(ids, "ids", cfg.vocab_size)
        B, t = ids.shape
        if past + t > cfg.max_position_embeddings:
            raise ValueError(f"positions up to {past + t} exceed max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        attention_mask = self._check_mask(attention_mask, (B, past + t))
        rope = self._rope(B, t, past, position_ids)
        x, _ = self.model.embed_tokens.forward(ids)         # (B, t, d)
        for layer, layer_kv in zip(self.model.layers, kv):
            x = layer.forward_cached(x, rope, layer_kv, past, attention_mask)
        h, _ = self.model.norm.forward(x[:, -1:] if last_only else x)
        return self.head_forward(h)[0]                      # (B, t or 1, V)
