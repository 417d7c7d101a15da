"""``LlamaConfig``: the sizes and options of a Llama-family decoder (docs/llama.md#config).

One config serves ``llama``, ``qwen2`` (``attention_bias``: biases on q/k/v) and ``mistral``
(a Llama whose sliding window, where it has one, covers the whole context). The fields are
transformers' names; its ``rope_parameters`` dict is spread over ``rope_theta``,
``rope_type`` and the scaling fields (``rope_factor`` is its ``factor``), so the saved config
stays flat.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..ops.rope import LLAMA3_FIELDS, ROPE_TYPES

SCALING_FIELDS = {"default": (), "linear": ("factor",), "llama3": LLAMA3_FIELDS}
FIELD_OF = {"factor": "rope_factor", "low_freq_factor": "low_freq_factor",
            "high_freq_factor": "high_freq_factor",
            "original_max_position_embeddings": "original_max_position_embeddings"}


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
    # the scaling fields of rope_parameters (None where rope_type has no use for one)
    rope_factor: float | None = None         # "factor": linear, llama3
    low_freq_factor: float | None = None     # llama3
    high_freq_factor: float | None = None    # llama3
    original_max_position_embeddings: int | None = None   # llama3
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
        for key, field in FIELD_OF.items():
            value = getattr(self, field)
            if key in needed:
                if value is None:
                    raise ValueError(f"rope_type {self.rope_type!r} needs {field}")
                setattr(self, field, _positive_number(field, value))
            elif value is not None:
                raise ValueError(f"{field} has no use with rope_type {self.rope_type!r}; "
                                 "leave it None")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must exceed low_freq_factor")

    @property
    def rope_scaling(self) -> dict:
        """The scaling fields under transformers' names (``factor``, ...)."""
        return {key: getattr(self, FIELD_OF[key]) for key in SCALING_FIELDS[self.rope_type]}

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
