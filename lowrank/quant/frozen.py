"""What every quantized frozen weight shares (NF4, GGUF blocks): ``.data`` dequantizes on
read; assigning ``.data`` (a merge, a ReLoRA restart) keeps that float array instead, so the
quantization error is never compounded by re-quantizing; it never takes a gradient."""
from __future__ import annotations

from ..nn.module import Parameter


class QuantizedParameter(Parameter):
    """A subclass supplies ``_dequantized()``, ``_quantized_shape``, ``_quantized_dtype()``
    and ``_quantized_nbytes()``, and names itself in ``kind`` for errors."""

    __slots__ = ("_plain",)
    kind = "quantized"

    @property
    def data(self):
        return self._dequantized() if self._plain is None else self._plain

    @data.setter
    def data(self, value):
        self._plain = value

    @property
    def is_quantized(self) -> bool:
        return self._plain is None

    @property
    def shape(self):
        return self._quantized_shape if self._plain is None else self._plain.shape

    @property
    def dtype(self):
        return self._quantized_dtype() if self._plain is None else self._plain.dtype

    def nbytes(self) -> int:
        return self._quantized_nbytes() if self._plain is None else int(self._plain.nbytes)

    def accumulate(self, grad) -> None:
        raise RuntimeError(f"a gradient was computed for {self.kind} (frozen) weight")
