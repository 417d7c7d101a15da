"""``LlamaConfig``: the sizes and options of a Llama-family decoder (docs/llama.md#config).

One config serves ``llama``, ``qwen2`` (``attention_bias``: biases on q/k/v) and ``mistral``
(a Llama whose sliding window, where it has one, covers the whole context). The fields are
transformers' names; the rope fields are its ``rope_parameters`` split in two
(``rope_theta`` and the scaling dict of ``rope_type``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..ops.rope import LLAMA3_FIELDS, ROPE_TYPES

SCALING_FIELDS = {"default": (), "linear": ("factor",), "llama3": LLAMA3_FIELDS}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None   # None: one key/value head per query head
    head_dim: int | None = None              # None: hidden_size / num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict | None = None         # the fields rope_type needs (factor, ...)
    tie_word_embeddings: bool = False
    attention_bias: bool = False             # biases on q_proj, k_proj, v_proj (Qwen2)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            _positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({self.num_attention_heads}) when "
                                 "head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE turns pairs), got {self.head_dim}")
        self.rms_norm_eps = _positive_number("rms_norm_eps", self.rms_norm_eps)
        self.rope_theta = _positive_number("rope_theta", self.rope_theta)
        self._check_rope()
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _check_rope(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (lowrank "
                             f"implements {list(ROPE_TYPES)})")
        needed = SCALING_FIELDS[self.rope_type]
        scaling = dict(self.rope_scaling or {})
        if not isinstance(self.rope_scaling or {}, dict):
            raise ValueError(f"rope_scaling must be a dict, got {self.rope_scaling!r}")
        extra = sorted(set(scaling) - set(needed))
        missing = [k for k in needed if k not in scaling]
        if extra or missing:
            raise ValueError(f"rope_scaling for rope_type {self.rope_type!r} needs exactly "
                             f"{list(needed)}; {'unknown' if extra else 'missing'} field "
                             f"{(extra or missing)[0]!r}")
        for key in needed:
            scaling[key] = _positive_number(f"rope_scaling.{key}", scaling[key])
        if self.rope_type == "llama3" and \
                scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ValueError("rope_scaling.high_freq_factor must exceed low_freq_factor")
        self.rope_scaling = scaling or None

    @property
    def context(self) -> int:
        return self.max_position_embeddings

    def parameter_floor(self) -> int:
        """How many numbers the parameters hold at least (checked against a file's size
        before anything is allocated)."""
        d, hs = self.hidden_size, self.head_dim
        attn = d * hs * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * d * self.intermediate_size + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.num_hidden_layers * per_layer + d

    def to_dict(self) -> dict:
        return {"model_type": "llama", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "LlamaConfig":
        data = dict(data)
        data.pop("model_type", None)
        return cls(**data)
