"""Functional forward/backward pairs (llm.c style): ``*_forward`` returns ``(out, cache)``."""
from .linear import linear_forward, linear_backward, check_input
from .embedding import embedding_forward, embedding_backward
from .layernorm import layernorm_forward, layernorm_backward
from .gelu import gelu_forward, gelu_backward, gelu_erf_forward, gelu_erf_backward
from .tanh import tanh_forward, tanh_backward
from .attention import (attention_forward, attention_backward, attention_cached,
                        attention_varlen_forward, attention_varlen_backward)
from .cross_entropy import cross_entropy_forward, cross_entropy_backward
from .dropout import dropout_forward, dropout_backward

__all__ = ["linear_forward", "linear_backward", "check_input",
           "embedding_forward", "embedding_backward", "layernorm_forward", "layernorm_backward",
           "gelu_forward", "gelu_backward", "gelu_erf_forward", "gelu_erf_backward",
           "tanh_forward", "tanh_backward", "attention_forward", "attention_backward",
           "attention_cached", "attention_varlen_forward", "attention_varlen_backward",
           "cross_entropy_forward", "cross_entropy_backward",
           "dropout_forward", "dropout_backward"]
