"""Many adapters over one frozen base in one process (PEFT's mixed-batch ``adapter_names=``,
S-LoRA): the model, modules and views that ``lowrank.app.multi_run.MultiTrainer`` drives.

K independent adapters train side by side. A batch is the concatenation of K row groups
(adapter k's sequences); the frozen model runs once over all of it; every adapted Linear is a
``MultiAdapterLinear``: the frozen base ``(W0, b0)`` once plus one ``AdaptedLinear`` per
adapter (built by the registry from the same W0, b0 with that adapter's config and seed, so
it is the very layer ``inject`` would build alone). With flattened input rows R_k of group k:

* fast path (``has_delta_path()``: ``delta_forward``/``delta_backward``, adapters/base.py,
  and its base is still the shared W0):
      Y = X W0ᵀ + b0 over all rows (one GEMM),    Y[R_k] += Δy_k(X[R_k])
      dX = G W0 over all rows (one GEMM),         dX[R_k] += dx_Δk(G[R_k])
* fallback (DoRA, svd, RoSA, PiSSA/OLoRA/MiLoRA inits, ReLoRA after a restart, a merged
  adapter): ``Y[R_k], dX[R_k]`` = the adapter's own forward/backward on its rows.

Consecutive fast groups share one GEMM, so with every group fast it is one ``x W0ᵀ`` and
one ``G W0`` per layer and step. "Its base is still the shared W0" is an identity test: at
build time a layer whose copied W0 is bit-identical to the base gets the shared array itself
(``a.weight.data is W0``); every variant that rewrites its base assigns a *new* array (PiSSA
at init, ReLoRA's restart, merge, loading a saved base), which ends the sharing for that
adapter only. Frozen bases are never written in place (AdamW touches trainable ones only).

Each adapter's gradient is exactly its gradient alone: the loss is Σ_k (mean cross-entropy
over group k), adapter k's parameters see only rows R_k, and row-wise ops (LayerNorm, GELU,
attention within a sequence) do not mix groups. ``AdapterView(model, k)`` presents adapter k
as a model holding only it (``named_modules``/``named_parameters`` with the names of a
single-adapter model), so a ``Trainer``, the step hooks (AdaLoRA's allocator, SoRA's gate
step, ...) and ``checkpoint.save_adapter``/``load_adapter`` work on it unchanged.
"""
from __future__ import annotations

from .. import backend
from ..adapters import AdaptedLinear, AdapterConfig
from ..adapters.inject import SEED_STRIDE, _set_child, select_targets
from ..nn.layers import Linear
from ..nn.module import Module, Parameter
from ..ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..ops.linear import check_input, linear_forward



def base_forward(x, weight, bias):
    """The shared frozen product ``x W0ᵀ + b0`` (N, m) (a function, so tests can count it)."""
    return linear_forward(x, weight, bias)[0]


def base_backward(dy, weight):
    """The shared frozen product ``G W0`` (N, n)."""
    return dy @ weight


class MultiAdapterLinear(Module):
    """One frozen ``(W0, b0)`` and adapters ``{k: AdaptedLinear}``; ``groups`` (set per batch
    by ``set_groups``) maps consecutive row ranges of the 2-D input to adapter indices (an
    index this layer holds no adapter for gets the plain base). ``fast = False`` forces the
    fallback for every group (benchmarks, tests)."""

    fast = True

    def __init__(self, weight, bias, adapters: dict):
        self.weight = Parameter(weight, trainable=False)
        self.bias = None if bias is None else Parameter(bias, trainable=False)
        self.adapters = dict(adapters)
        self.groups = None       # [(adapter index, slice of rows)], covering all rows in order
        for a in self.adapters.values():
            self._share_base(a)

    def named_children(self):
        for k, a in self.adapters.items():
            yield str(k), a

    def _share_base(self, a) -> None:
        """Hand the adapter the shared W0 (and frozen b0) when its copy is bit-identical."""
        if bool((a.weight.data == self.weight.data).all()):
            a.weight.data = self.weight.data
        if a.bias is not None and not a.bias.trainable \
                and bool((a.bias.data == self.bias.data).all()):
            a.bias.data = self.bias.data

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def shares_base(self, k) -> bool:
        """Whether group k runs on the shared product (no adapter here counts as sharing)."""
        a = self.adapters.get(k)
        return a is None or (self.fast and a.has_delta_path() and not a.merged
                             and a.weight.data is self.weight.data)

    def _plan(self, n_rows: int):
        """``(groups, fast flags, runs)``: runs are the row ranges of consecutive fast groups."""
        groups = self.groups if self.groups is not None else [(None, slice(0, n_rows))]
        if groups[0][1].start != 0 or groups[-1][1].stop != n_rows or any(
                a[1].stop != b[1].start for a, b in zip(groups, groups[1:])):
            raise ValueError(f"row groups {[(k, s.start, s.stop) for k, s in groups]} do not "
                             f"cover the {n_rows} input rows in order (call set_groups)")
        fast = [self.shares_base(k) for k, _ in groups]
        runs = []
        for (_, rows), f in zip(groups, fast):
            if not f:
                continue
            if runs and runs[-1].stop == rows.start:
                runs[-1] = slice(runs[-1].start, rows.stop)
            else:
                runs.append(rows)
        return groups, fast, runs

    def forward(self, x):
        check_input(x, self.weight.data)
        if x.ndim != 2:
            raise ValueError(f"MultiAdapterLinear needs 2-D (N, in_features) inputs, got "
                             f"shape {tuple(x.shape)}")
        N, W, b = x.shape[0], self.weight.data, self._bias_data()
        groups, fast, runs = self._plan(N)
        if runs == [slice(0, N)]:
            y = base_forward(x, W, b)                                    # (N, m), one GEMM
        else:
            y = backend.get_namespace(x).empty((N, self.out_features), dtype=x.dtype)
            for rows in runs:
                y[rows] = base_forward(x[rows], W, b)                    # (N_run, m)
        caches = []
        for (k, rows), f in zip(groups, fast):
            a = self.adapters.get(k)
            if a is None:
                caches.append(None)
            elif f:
                delta, cache = a.delta_forward(x[rows], None)            # (N_k, m)
                if a.bias is not None and a.bias.data is not self.bias.data:
                    delta += a.bias.data - self.bias.data                # its own trained bias
                y[rows] += delta
                caches.append(cache)
            else:
                y[rows], cache = a.forward(x[rows])                      # (N_k, m)
                caches.append(cache)
        return y, (groups, fast, runs, caches)

    def backward(self, dy, cache, need_dx: bool = True):
        groups, fast, runs, caches = cache   # (dx is always formed here; need_dx is advisory)
        N, W = dy.shape[0], self.weight.data
        if runs == [slice(0, N)]:
            dx = base_backward(dy, W)                                    # (N, n), one GEMM
        else:
            dx = backend.get_namespace(dy).empty((N, self.in_features), dtype=dy.dtype)
            for rows in runs:
                dx[rows] = base_backward(dy[rows], W)                    # (N_run, n)
        for (k, rows), f, c in zip(groups, fast, caches):
            a = self.adapters.get(k)
            if a is None:
                continue
            if f:
                dx[rows] += a.delta_backward(dy[rows], c)                # (N_k, n)
                if a.bias is not None and a.bias.trainable:
                    a.bias.accumulate(dy[rows].sum(axis=0))              # (m,)
            else:
                dx[rows] = a.backward(dy[rows], c)                       # (N_k, n)
        return dx

    def _bias_data(self):
        return None if self.bias is None else self.bias.data

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, adapters {sorted(self.adapters)}"


# --- building and driving a multi-adapter model ----------------------------------------------

def inject_multi(model, specs) -> list[str]:
    """Replace the Linears of ``model`` targeted by any adapter with ``MultiAdapterLinear``s.

    ``specs``: one ``(config, targets, seed)`` per adapter (targets as in ``inject``). Layer i
    of adapter k (i counts that adapter's targets in model order) gets the seed
    ``seed_k + 7919 i``, exactly what ``inject(model, config_k, targets_k, seed_k)`` gives, so
    each adapter starts as it would alone. Freezes the model; returns the replaced names."""
    specs = list(specs)
    if not specs:
        raise ValueError("specs must hold at least one (config, targets, seed)")
    chosen: dict = {}
    for k, (cfg, targets, seed) in enumerate(specs):
        if not isinstance(cfg, AdapterConfig):
            raise ValueError(f"adapter {k}: config must be an adapter config, got "
                             f"{type(cfg).__name__}")
        if cfg.bias == "all":
            raise ValueError(f"adapter {k}: bias='all' would train the shared base's biases; "
                             "use bias='lora_only' (each adapter's own bias) with several "
                             "adapters")
        for i, (name, linear) in enumerate(select_targets(model, targets, f"adapter {k}: ")):
            chosen.setdefault(name, (linear, {}))[1][k] = (cfg, seed + SEED_STRIDE * i)
    model.freeze()
    names = []
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    for name, linear in linears:       # model order
        if name not in chosen:
            continue
        W0 = linear.weight.data
        b0 = None if linear.bias is None else linear.bias.data
        adapters = {k: AdaptedLinear(W0, b0, cfg, seed=seed)
                    for k, (cfg, seed) in sorted(chosen[name][1].items())}
        _set_child(model, name, MultiAdapterLinear(W0, b0, adapters))
        names.append(name)
    for k in range(len(specs)):   # what each adapter's layers share (VeRA's projections)
        layers = [m.adapters[k] for _, m in multi_modules(model) if k in m.adapters]
        if layers:
            type(layers[0]).after_inject(model, layers)
    return names


def multi_modules(model) -> list[tuple[str, MultiAdapterLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiAdapterLinear)]


def set_groups(model, groups) -> None:
    """``groups``: ``[(adapter index, first row, stop row)]`` over the flattened rows."""
    slices = [(k, slice(int(a), int(b))) for k, a, b in groups]
    for _, m in multi_modules(model):
        m.groups = slices


def multi_loss(model, batches):
    """``batches``: ``[(adapter index, x (B_k, T), y (B_k, T))]`` -> ``(losses, cache)``: one
    forward over the concatenated batch, the mean cross-entropy of each group."""
    if not batches:
        raise ValueError("multi_loss needs at least one batch")
    xs = [x for _, x, _ in batches]
    T = xs[0].shape[1]
    if any(x.ndim != 2 or x.shape[1] != T for x in xs):
        raise ValueError(f"every group needs (B_k, T) token ids with one T, got shapes "
                         f"{[tuple(x.shape) for x in xs]}")
    x = xs[0] if len(xs) == 1 else backend.get_namespace(*xs).concatenate(xs, axis=0)
    spans, start = [], 0
    for xb in xs:
        spans.append((start, start + xb.shape[0]))
        start += xb.shape[0]
    set_groups(model, [(k, a * T, b * T) for (k, _, _), (a, b) in zip(batches, spans)])
    logits, cache = model.forward(x)                                     # (B, T, V)
    losses, ce = [], []
    for (_, _, y), (a, b) in zip(batches, spans):
        loss, c = cross_entropy_forward(logits[a:b], y)
        losses.append(loss)
        ce.append(c)
    return losses, (cache, ce, spans, logits)


def multi_loss_backward(model, cache, dlosses) -> None:
    """Backward of ``Σ_k dlosses[k] · loss_k``; the logits buffer becomes dlogits (it is not
    needed after the cross-entropy forward)."""
    model_cache, ce, spans, logits = cache
    for (a, b), c, d in zip(spans, ce, dlosses):
        logits[a:b] = cross_entropy_backward(c, d)                       # (B_k, T, V)
    model.backward(logits, model_cache)


class AdapterView(Module):
    """Adapter k of a multi-adapter ``model`` as a model that holds only it: modules and
    parameters carry the names a single-adapter model gives (``blocks.0.attn.q.lora_A``);
    ``forward``/``loss`` run the shared model with every row in group k. Only the walks
    (``named_modules``/``named_parameters``) differ from a Module; the rest is inherited."""

    def __init__(self, model, index: int):
        self.model, self.index = model, int(index)
        if not self.layers():
            raise ValueError(f"the model holds no adapter {index}")

    def layers(self) -> list[tuple[str, AdaptedLinear]]:
        return [(name, m.adapters[self.index]) for name, m in multi_modules(self.model)
                if self.index in m.adapters]

    @property
    def config(self):
        return self.model.config

    @property
    def xp(self):
        return self.model.xp

    @property
    def dtype(self):
        return self.model.dtype

    def named_modules(self, prefix: str = ""):
        for name, a in self.layers():
            yield from a.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "", trainable_only: bool = False):
        for name, a in self.layers():
            yield from a.named_parameters(f"{prefix}.{name}" if prefix else name, trainable_only)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """As the single-adapter model would count: its own parameters, plus (all) the shared
        frozen ones, each base weight and bias once."""
        own = sum(int(p.data.size) for _, a in self.layers() for n, p in a.named_parameters()
                  if n not in ("weight", "bias") and (p.trainable or not trainable_only))
        if trainable_only:
            return own + sum(int(a.bias.data.size) for _, a in self.layers()
                             if a.bias is not None and a.bias.trainable)
        adapters = {id(a) for _, m in multi_modules(self.model) for a in m.adapters.values()}
        shared = sum(int(p.data.size) for name, m in self.model.named_modules()
                     if id(m) not in adapters for p in vars(m).values()
                     if isinstance(p, Parameter))
        return own + shared

    def _all_rows(self, idx) -> None:
        set_groups(self.model, [(self.index, 0, idx.shape[0] * idx.shape[1])])

    def forward(self, idx):
        self._all_rows(idx)
        return self.model.forward(idx)

    def loss(self, idx, targets):
        self._all_rows(idx)
        return self.model.loss(idx, targets)

    def loss_backward(self, cache, dloss: float = 1.0) -> None:
        self.model.loss_backward(cache, dloss)


__all__ = ["MultiAdapterLinear", "AdapterView", "inject_multi", "multi_modules", "set_groups",
           "multi_loss", "multi_loss_backward", "base_forward", "base_backward"]
