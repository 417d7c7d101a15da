"""A torch twin of ``lowrank.GPT`` (docs/models.md#gpt), written directly in torch — the autograd oracle.

It does not import lowrank: parity tests load the same weights into both from a dict of
NumPy arrays keyed by lowrank's parameter names (``tok_emb.weight``, ``blocks.0.attn.q.weight``, ...),
which are also this module's ``state_dict`` keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TorchAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.n_head = n_head
        self.use_sdpa = False

    def forward(self, x):
        B, T, d = x.shape
        H = self.n_head

        def heads(t):
            return t.view(B, T, H, d // H).transpose(1, 2)        # (B, H, T, hs)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.use_sdpa:   # PyTorch's fused kernel: the fastest a torch user would write
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, H, T, hs)
            return self.o(y.transpose(1, 2).reshape(B, T, d))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // H)      # (B, H, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)           # (B, T, d)
        return self.o(y)


class TorchMLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TorchBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = TorchAttention(d, n_head)
        self.ln2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = TorchMLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    def __init__(self, vocab_size: int, context: int, n_layer: int, n_head: int, d_model: int,
                 tie_embeddings: bool = True, dtype=torch.float32):
        super().__init__()
        self.tie_embeddings = tie_embeddings
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(TorchBlock(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, eps=1e-5)
        if not tie_embeddings:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.to(dtype)

    @classmethod
    def from_config(cls, config: dict, dtype=torch.float32) -> "TorchGPT":
        """``config``: the ``GPTConfig.to_dict()`` fields."""
        return cls(**config, dtype=dtype)

    def load_numpy(self, weights: dict) -> "TorchGPT":
        """Copy ``{parameter name: numpy array}`` into the parameters (strict: every key, no extra)."""
        dtype = next(self.parameters()).dtype
        state = {k: torch.tensor(v, dtype=dtype) for k, v in weights.items()}
        self.load_state_dict(state, strict=True)
        return self

    def forward(self, idx):
        """``idx (B, T)`` long -> logits ``(B, T, V)``."""
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb.weight[:T]
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        head = self.tok_emb.weight if self.tie_embeddings else self.lm_head.weight
        return h @ head.T

    def loss(self, idx, targets):
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def numpy_grads(self) -> dict:
        """``{name: grad as float64 numpy}`` for parameters that have a gradient."""
        return {n: p.grad.detach().double().numpy().copy()
                for n, p in self.named_parameters() if p.grad is not None}
