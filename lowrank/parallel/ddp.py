"""Data-parallel gradient averaging and the parameter-drift check.

``GradientAllReduce(model, comm)`` owns one flat buffer (allocated once per parameter layout,
in the parameters' dtype, on their backend). Each step it copies the gradients of the
*trainable* parameters into it (frozen weights have none to send: the adapter's saving in
communication), appends a few host scalars (the loss), all-reduces it once, divides by the
number of ranks and copies the averages back into ``p.grad`` in place. The layout is rebuilt
only when the set of trainable parameters changes (IncreLoRA's new triplets, SoRA's prune);
before each all-reduce the ranks compare a 3-number fingerprint of it (one tiny collective),
so ranks whose parameter sets diverged stop with a clear error, not a garbled reduction.

``check_drift(step, probe)`` compares float64 checksums of every parameter (frozen ones too:
ReLoRA merges into the base weight) and of the model's output on a fixed ``probe`` batch
(dropout off) across ranks, bit for bit, and raises naming the step and what differs. The
output catches state that is not a parameter (a mask, a sparse support, a rank pattern)
chosen differently on some rank: data-parallel replicas must stay identical.
"""
from __future__ import annotations

import zlib

from .. import backend


class ParameterDriftError(RuntimeError):
    """Data-parallel ranks no longer hold identical parameters."""


class GradientAllReduce:
    def __init__(self, model, comm):
        self.model, self.comm = model, comm
        self._signature = None
        self._layout = []          # (parameter, offset, size)
        self._fingerprint = None   # (values, tensors, crc32 of names and shapes) as floats
        self.buffer = None
        self.bytes_per_step = 0    # bytes of the last all-reduced buffer (per rank, one way)
        self.steps = 0

    def _trainable(self) -> list:
        return [(n, p) for n, p in self.model.named_parameters(trainable_only=True)
                if p.grad is not None]

    def _build(self, params, n_scalars: int) -> None:
        dtypes = {p.grad.dtype for _, p in params}
        if len(dtypes) > 1:
            raise ValueError(f"gradients of one dtype are needed for one flat buffer, got "
                             f"{sorted(str(d) for d in dtypes)}")
        if not params:
            raise ValueError("no trainable parameter has a gradient to all-reduce")
        offset, self._layout = 0, []
        for _, p in params:
            size = int(p.grad.size)
            self._layout.append((p, offset, size))
            offset += size
        xp = backend.get_namespace(params[0][1].grad)
        self.buffer = xp.zeros(offset + n_scalars, dtype=dtypes.pop())
        described = repr([(n, tuple(p.grad.shape)) for n, p in params]).encode()
        self._fingerprint = [float(offset), float(len(params)), float(zlib.crc32(described))]

    def allreduce(self, scalars=(), step=None) -> list[float]:
        """Average the trainable gradients (in place) and ``scalars`` over the ranks; returns
        the averaged scalars. ``step`` only names the step in errors."""
        params = self._trainable()
        signature = (tuple((n, id(p), tuple(p.grad.shape)) for n, p in params), len(scalars))
        if signature != self._signature:
            self._build(params, len(scalars))
            self._signature = signature
        if not self.comm.checksum_agree(self._fingerprint):
            values, tensors, _ = self._fingerprint
            raise ParameterDriftError(
                f"data-parallel ranks hold different sets of trainable parameters at step "
                f"{step if step is not None else '?'} (this rank: {int(tensors)} tensors, "
                f"{int(values)} values): a variant changed its parameters (grew or pruned a "
                "rank) from a rank-local statistic; it has to combine that statistic over "
                "the ranks with trainer.comm.allreduce_sum first")
        buf, n = self.buffer, self.buffer.size - len(scalars)
        for p, offset, size in self._layout:
            buf[offset:offset + size] = p.grad.reshape(-1)
        for i, value in enumerate(scalars):
            buf[n + i] = float(value)
        self.comm.allreduce_sum(buf)
        buf *= 1.0 / self.comm.size
        for p, offset, size in self._layout:
            p.grad[...] = buf[offset:offset + size].reshape(p.grad.shape)
        self.bytes_per_step = int(buf.nbytes)
        self.steps += 1
        return [float(v) for v in backend.to_numpy(buf[n:])] if scalars else []

    # --- drift ---------------------------------------------------------------------------------
    def checksums(self, probe=None):
        """Host float64 ``(names, values)``: per parameter (and for the model's output on
        ``probe``) Σp, Σ|p| and Σ of the even-indexed entries (position-sensitive),
        accumulated in float64 on the device."""
        arrays = [(name, p.data) for name, p in self.model.named_parameters()]
        if probe is not None:
            training = getattr(self.model, "training", True)
            self.model.eval()
            arrays.append(("<model output on the probe batch>", self.model.forward(probe)[0]))
            self.model.train(training)
        names, stats = [], []
        for name, a in arrays:
            xp = backend.get_namespace(a)
            flat = a.reshape(-1)
            names.append(name)
            stats += [flat.sum(dtype=xp.float64), abs(flat).sum(dtype=xp.float64),
                      flat[::2].sum(dtype=xp.float64)]
        xp = backend.get_namespace(*stats)
        return names, backend.to_numpy(xp.stack(stats))

    def check_drift(self, step: int, probe=None) -> None:
        names, values = self.checksums(probe)
        differs = self.comm.disagreement(values)
        if differs.any():
            bad = sorted({names[i // 3] for i in range(differs.size) if differs[i]})
            raise ParameterDriftError(
                f"data-parallel ranks hold different models at step {step}: "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} ({len(bad)} of "
                f"{len(names)} differ). Every rank must see identical gradients and make "
                "identical decisions; a rank-local statistic (e.g. one taken from local "
                "activations) has to be combined with trainer.comm.allreduce_sum first")


__all__ = ["GradientAllReduce", "ParameterDriftError"]
