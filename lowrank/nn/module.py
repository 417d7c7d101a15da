"""The smallest Parameter/Module that works (micrograd-sized): no hooks, no autograd.

Gradients follow llm.c: ``zero_grad()`` allocates zeroed ``grad`` arrays for trainable
parameters only, and every ``backward`` *accumulates* into them. A frozen parameter's
``grad`` stays ``None``, and layers check ``trainable`` before computing it at all.
"""
from __future__ import annotations

from .. import backend


class Parameter:
    __slots__ = ("data", "grad", "trainable")

    def __init__(self, data, trainable: bool = True):
        self.data = data
        self.grad = None
        self.trainable = trainable

    def accumulate(self, grad) -> None:
        """``self.grad += grad`` (allocating on first use if zero_grad was skipped)."""
        if not self.trainable:
            raise RuntimeError("a gradient was computed for a frozen parameter")
        if self.grad is None:
            self.grad = grad.copy()
        else:
            self.grad += grad

    def zero_grad(self) -> None:
        if self.trainable:
            xp = backend.get_namespace(self.data)
            self.grad = xp.zeros_like(self.data)
        else:
            self.grad = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}, trainable={self.trainable})"


class Module:
    """Holds Parameters and sub-Modules as attributes; names follow attribute order."""

    training: bool = True

    def __call__(self, *args, **kwargs):
        """``model(x)``: the forward pass's output without its cache (PyTorch's habit, for
        inference); training goes through ``forward``/``backward`` or ``loss``/
        ``loss_backward``, which keep the cache the backward pass needs."""
        return self.forward(*args, **kwargs)[0]

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, child in enumerate(value):
                    yield f"{name}.{i}", child

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "", trainable_only: bool = False):
        for name, value in vars(self).items():
            if isinstance(value, Parameter) and (value.trainable or not trainable_only):
                yield (f"{prefix}.{name}" if prefix else name), value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name, trainable_only)

    def parameters(self, trainable_only: bool = False):
        return [p for _, p in self.named_parameters(trainable_only=trainable_only)]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode: bool = True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def freeze(self) -> None:
        for p in self.parameters():
            p.trainable = False
            p.grad = None

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(int(p.data.size) for p in self.parameters(trainable_only))

    # --- batch shards (lowrank.parallel.shards): state a backward keeps besides gradients ---
    def reset_replica_state(self) -> None:
        """Called on a fresh replica (a shallow copy) of this module: drop any state its
        backward accumulates other than gradients, so the replica starts from none."""

    def absorb_replica(self, replica: "Module") -> None:
        """Merge into this module what ``replica``'s backward kept besides gradients."""

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        """The module tree, one line a module (PyTorch's layout), parameters as shapes."""
        own = [f"{n}: {tuple(p.shape)}{'' if p.trainable else ' frozen'}"
               for n, p in vars(self).items() if isinstance(p, Parameter)]
        head = f"{type(self).__name__}({self.extra_repr() or ', '.join(own)}"
        children = [f"  ({name}): " + repr(child).replace("\n", "\n  ")
                    for name, child in self.named_children()]
        return head + (")" if not children else "\n" + "\n".join(children) + "\n)")
