"""transformers' Llama-family models as the oracle of tests/models/test_llama_*.py: tiny random
checkpoints written with ``save_pretrained``, and a float64 mode.

transformers computes two things in float32 whatever the model's dtype: RMSNorm's statistics
(``hidden_states.to(torch.float32)``) and the RoPE tables (``dtype=torch.float``). A float64
oracle needs both in float64: ``float64_oracle()`` makes ``torch.float`` float64 while the
model is built and run (the rope tables then come from transformers' own formulas in float64)
and runs RMSNorm's statistics in ``max(input dtype, float32)``; attention is SDPA (the eager
path's softmax is float32 too).
"""
import contextlib
import importlib

import numpy as np
import torch
import transformers

FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}
NORMS = {"llama": "LlamaRMSNorm", "qwen2": "Qwen2RMSNorm", "mistral": "MistralRMSNorm"}


def _rmsnorm_at_least_float32(self, hidden):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    x = hidden.to(dtype)
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon)).to(hidden.dtype)


@contextlib.contextmanager
def float64_oracle():
    modules = [importlib.import_module(f"transformers.models.{f}.modeling_{f}") for f in NORMS]
    saved = [(m, getattr(m, NORMS[f]).forward) for m, f in zip(modules, NORMS)]
    old_float = torch.float
    torch.float = torch.float64
    for module, f in zip(modules, NORMS):
        getattr(module, NORMS[f]).forward = _rmsnorm_at_least_float32
    try:
        yield
    finally:
        torch.float = old_float
        for (module, forward), f in zip(saved, NORMS):
            getattr(module, NORMS[f]).forward = forward


def tiny_checkpoint(directory, family: str, seed: int = 0, **fields):
    """A random ``family`` model saved to ``directory``; every parameter moved off its init
    (biases and norm weights too), so no gradient is trivially zero."""
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    sizes = dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "mistral":
        sizes["sliding_window"] = None
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**sizes, **fields}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)
    model.save_pretrained(directory)
    return directory


def load(directory, family: str, dtype: str):
    """The transformers model of ``directory`` in ``dtype`` (float64: inside float64_oracle)."""
    model_cls = getattr(transformers, FAMILIES[family][1])
    return model_cls.from_pretrained(directory, dtype=getattr(torch, dtype),
                                     attn_implementation="sdpa").eval()


def logits_and_grads(model, ids, mask, R):
    """Logits and every parameter's gradient of ``Σ logits ⊙ R``."""
    model.zero_grad()
    out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    (out.logits * torch.tensor(R, dtype=out.logits.dtype)).sum().backward()
    grads = {n: p.grad.detach().numpy().astype(np.float64)
             for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().numpy().astype(np.float64), grads
