"""The official implementations' update rules, transcribed naively in NumPy (docs/variants.md).

Each function follows the authors' code statement by statement (in-place masks stay in-place
masks, torch's loops stay loops), on host float64 copies, so that a test can run lowrank's
default next to it step by step. Nothing here imports lowrank.

* SoRA (TsinghuaC3I/SoRA): ``SparseAdamW.step`` of ``src/sparse_optimizer.py`` and the L1 term
  of ``SparseTrainerMixin.compute_loss`` in ``src/trainer.py``;
* RoSA (IST-DASLab/peft-rosa ``src/peft/tuners/rosa``): the layer's forward (S on the undropped
  x), the gradient collection of ``hooks.py`` and ``scheduler.py``'s mask, and the two-run
  pipeline (mask run, then a fresh run with the mask loaded);
* IncreLoRA (FeiyuZhang98/IncreLoRA ``loralib/loralib/increlora.py``): ``SVDLinear`` with its
  per-triplet parameter lists, reserves (``add_reserve_param``), growth
  (``increase_to_target_rank``), ``compute_orth_regu``, and a torch-AdamW per tensor;
* ReLoRA (Guitaricet/relora ``peft_pretraining/training_utils.py``):
  ``_get_cosine_schedule_with_multiple_warmups_lambda``.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["sparse_adamw_step", "sora_loss_term", "relora_lr_lambda", "rosa_forward",
           "rosa_mask", "TorchAdamW", "rosa_official_run", "NaiveIncreLoraLayer",
           "increlora_orth_regu"]


def _host64(a):
    if a is None:
        return None
    if hasattr(a, "get") and not isinstance(a, np.ndarray):   # cupy / strict arrays
        a = a.get()
    return np.array(a, dtype=np.float64)


# --- SoRA -------------------------------------------------------------------------------------
def sparse_adamw_step(p, grad, state: dict, lr: float, sparse_lambda: float,
                      betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
    """One ``SparseAdamW.step`` on ``p`` (modified in place and returned)."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(p)
        state["exp_avg_sq"] = np.zeros_like(p)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = betas
    state["step"] += 1
    exp_avg *= beta1
    exp_avg += (1.0 - beta1) * grad
    exp_avg_sq *= beta2
    exp_avg_sq += (1.0 - beta2) * grad * grad
    denom = np.sqrt(exp_avg_sq) + eps
    step_size = lr
    if correct_bias:
        bias_correction1 = 1.0 - beta1 ** state["step"]
        bias_correction2 = 1.0 - beta2 ** state["step"]
        step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
    to_add = (exp_avg / denom) * (-step_size)
    if weight_decay > 0.0:
        to_add = to_add + (-lr * weight_decay) * p
    p += to_add
    if sparse_lambda > 0:
        p[p > sparse_lambda] -= sparse_lambda
        p[p < -sparse_lambda] += sparse_lambda
        p[abs(p) < sparse_lambda] = 0.0
    return p


def sora_loss_term(gates, sparse_lambda: float):
    """``(value, grads)``: ``sparse_lambda · Σ|g| / p_total`` over all gates and its gradient
    (torch's abs: sign(g), 0 at 0)."""
    p_total = sum(g.size for g in gates)
    value = sparse_lambda * sum(np.abs(g).sum() for g in gates) / p_total
    return value, [sparse_lambda * np.sign(g) / p_total for g in gates]


# --- ReLoRA ------------------------------------------------------------------------------------
def relora_lr_lambda(current_step, *, num_training_steps, first_warmup_steps,
                     restart_warmup_steps, restart_every, min_lr_ratio):
    assert 0 < min_lr_ratio <= 1.0
    assert restart_every > 0
    if current_step < first_warmup_steps:
        return float(current_step) / float(max(1, first_warmup_steps))
    restart_step = current_step % restart_every
    restart_number = current_step // restart_every
    if restart_step < restart_warmup_steps:
        end_of_warmup_progress = (float(restart_number * restart_every)
                                  / float(max(1, num_training_steps - first_warmup_steps)))
        _cosine_decay = 0.5 * (1.0 + math.cos(math.pi * end_of_warmup_progress))
        warmup_lr_multiplier = min_lr_ratio + (1.0 - min_lr_ratio) * _cosine_decay
        return float(restart_step) / float(max(1, restart_warmup_steps)) * warmup_lr_multiplier
    progress = (float(current_step - first_warmup_steps)
                / float(max(1, num_training_steps - first_warmup_steps)))
    cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay


# --- torch.optim.AdamW, one state per tensor -------------------------------------------------
class TorchAdamW:
    """torch.optim.AdamW's update (eps after the bias-corrected √v), a state per array id."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state: dict = {}

    def step(self, key, p, grad, lr=None):
        lr = self.lr if lr is None else lr
        st = self.state.setdefault(key, {"step": 0, "m": np.zeros_like(p),
                                         "v": np.zeros_like(p)})
        b1, b2 = self.betas
        st["step"] += 1
        t = st["step"]
        p *= 1.0 - lr * self.weight_decay
        st["m"] = b1 * st["m"] + (1.0 - b1) * grad
        st["v"] = b2 * st["v"] + (1.0 - b2) * grad * grad
        denom = np.sqrt(st["v"]) / math.sqrt(1.0 - b2 ** t) + self.eps
        p -= (lr / (1.0 - b1 ** t)) * st["m"] / denom
        return p


# --- RoSA --------------------------------------------------------------------------------------
def rosa_forward(x, W0, b0, A, B, scaling, S, mask=None):
    """``x W0ᵀ + b0 + s·B(A(dropout(x))) + spa(x)``: S sees the undropped x."""
    x, W0, A, B, S = (_host64(a) for a in (x, W0, A, B, S))
    x_d = x if mask is None else x * _host64(mask)
    y = x @ W0.T + (0.0 if b0 is None else _host64(b0))
    y = y + scaling * (x_d @ A.T) @ B.T
    return y + x @ S.T


def rosa_mask(grads, density, grad_acc_mode="mean_squared"):
    """The official mask from the per-backward W0 gradients: running mean of g (or g²), then
    the top ``int(d·numel)`` of its absolute value (ties: the lower flat index here; torch's
    topk leaves them unspecified)."""
    collected, cnt = None, 0
    for g in grads:
        g = _host64(g)
        if grad_acc_mode == "mean_squared":
            g = g ** 2
        collected = g if collected is None else (collected * cnt + g) / (cnt + 1)
        cnt += 1
    k = int(density * collected.size)
    order = np.argsort(-np.abs(collected).reshape(-1), kind="stable")[:k]
    mask = np.zeros(collected.size, dtype=bool)
    mask[order] = True
    return mask.reshape(collected.shape)


def rosa_official_run(W0, A0, B0, scaling, batches, *, density, warmup, collect, lr, min_lr,
                      lr_warmup, steps, grad_acc_mode="mean_squared", lora_lr=None):
    """The official two-run pipeline on one linear layer with the linear loss Σ G ⊙ y per
    step (so dL/dy = G), no dropout, no clipping: run 1 trains LoRA for ``warmup + collect``
    steps, collecting Gᵀx during the last ``collect``; the mask is saved; run 2 starts from
    the same initial A0, B0 with S = 0 on the mask, a fresh AdamW and the schedule from step
    0 over ``steps - warmup - collect`` steps. ``batches[t] = (x, G)``. Returns run 2's
    ``[(A, B, S)]`` after each of its steps."""
    def lr_at(step, total):
        if step < lr_warmup:
            return lr * (step + 1) / lr_warmup
        progress = min(1.0, (step - lr_warmup) / max(1, total - lr_warmup))
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))

    W0 = _host64(W0)
    A, B = _host64(A0), _host64(B0)
    ratio = 1.0 if lora_lr is None else lora_lr / lr
    opt, grads, first = TorchAdamW(), [], warmup + collect
    for t in range(first):                       # run 1: LoRA (+ gradient collection)
        x, G = (_host64(a) for a in batches[t])
        u = x @ A.T
        dB, dA = scaling * G.T @ u, (scaling * G @ B).T @ x
        if t >= warmup:
            grads.append(G.T @ x)
        opt.step("A", A, dA, lr_at(t, steps) * ratio)
        opt.step("B", B, dB, lr_at(t, steps) * ratio)
    mask = rosa_mask(grads, density, grad_acc_mode)
    A, B, S = _host64(A0), _host64(B0), np.zeros_like(W0)
    opt, out, total = TorchAdamW(), [], steps - first
    for i in range(total):                       # run 2: fresh LoRA, optimizer, schedule
        x, G = (_host64(a) for a in batches[first + i])
        u = x @ A.T
        dB, dA = scaling * G.T @ u, (scaling * G @ B).T @ x
        dS = np.where(mask, G.T @ x, 0.0)
        rate = lr_at(i, total)
        opt.step("A", A, dA, rate * ratio)
        opt.step("B", B, dB, rate * ratio)
        values = S[mask]
        opt.step("S", values, dS[mask], rate)
        S[mask] = values
        out.append((A.copy(), B.copy(), S.copy()))
    return out


# --- IncreLoRA ---------------------------------------------------------------------------------
class NaiveIncreLoraLayer:
    """The official ``SVDLinear`` (no dropout): per-triplet tensors in lists, W = cat(B) @
    (cat(A) ⊙ cat(E)) · α/(ranknum + 1e-5), the backward hook's score, ``add_reserve_param``.
    ``rng``: the NumPy stream the reserves are drawn from (a, then b, per triplet)."""

    def __init__(self, W0, A, E, B, alpha, rng):
        self.W0, self.alpha, self.rng = _host64(W0), float(alpha), rng
        self.A, self.E, self.B = [_host64(A)], [_host64(E).reshape(-1, 1)], [_host64(B)]
        self.grad_on = [True]                 # requires_grad per triplet tensor (A, B)
        self.e_grad_on = [True]               # requires_grad of each E tensor
        self.group = [0]                      # optimizer group of each tensor (0: initial)
        self.ranknum = float(self.A[0].shape[0])
        self.score = 0.0
        self.hooked = True

    def W(self):
        A, E, B = (np.concatenate(self.A, 0), np.concatenate(self.E, 0),
                   np.concatenate(self.B, 1))
        return B @ (A * E) * self.alpha / (self.ranknum + 1e-5)

    def backward(self, x, G):
        """Gradients of Σ G ⊙ (x Wᵀ) for every tensor that requires one (None otherwise)."""
        x, G = _host64(x), _host64(G)
        dW = G.T @ x                                                     # (m, n)
        if self.hooked:
            self.score = np.abs(self.W() * dW).sum() / math.sqrt(dW.size)
        c = self.alpha / (self.ranknum + 1e-5)
        A, E, B = (np.concatenate(self.A, 0), np.concatenate(self.E, 0),
                   np.concatenate(self.B, 1))
        dB = c * dW @ (A * E).T
        dAE = c * B.T @ dW
        dA, dE = dAE * E, (dAE * A).sum(axis=1, keepdims=True)
        grads, row = [], 0
        for i, a in enumerate(self.A):
            k = a.shape[0]
            on, e_on = self.grad_on[i], self.e_grad_on[i]
            grads.append((dA[row:row + k] if on else None, dE[row:row + k] if e_on else None,
                          dB[:, row:row + k] if on else None))
            row += k
        return grads

    def add_reserve_param(self, add_r, advance_learn):
        n, m = self.W0.shape[1], self.W0.shape[0]
        for _ in range(add_r):
            a = self.rng.standard_normal(n).reshape(1, n) * 0.02
            b = self.rng.standard_normal(m).reshape(m, 1) * 0.02
            self.E.append(np.full((1, 1), 1e-5 if advance_learn else 0.0))
            self.A.append(a)
            self.B.append(b)
            self.grad_on.append(advance_learn)
            self.e_grad_on.append(False)
            self.group.append(None)           # set when the allocator adds the group


def increlora_orth_regu(layers, regu_weight):
    """``compute_orth_regu`` over every lora_A / lora_B tensor: ``(value, {(layer, i, 'A'|'B'):
    grad})`` (gradients for every tensor; the caller keeps those that require one)."""
    total, num, grads = 0.0, 0, {}
    for li, layer in enumerate(layers):
        for key, tensors in (("A", layer.A), ("B", layer.B)):
            for i, p in enumerate(tensors):
                cov = p @ p.T if key == "A" else p.T @ p
                M = cov - np.eye(cov.shape[0])
                norm = np.sqrt((M * M).sum())
                total += norm
                num += 1
                g = (2.0 / norm) * (M @ p if key == "A" else p @ M) if norm else 0.0 * p
                grads[(li, i, key)] = g
    return regu_weight * total / num, {k: regu_weight * g / num for k, g in grads.items()}


class NaiveIncreLoraAllocator:
    """The official ``RankAllocator.update_and_increase`` + torch-AdamW groups: group 0 at the
    scheduled lr, every added group at ``base_lr`` (a LambdaLR built before them never
    updates them)."""

    def __init__(self, layers, *, target_rank, add_r, top_h, init_warmup, incre_interval,
                 beta1, beta2, advance_learn, base_lr, reg_orth_coef):
        self.layers, self.target_rank, self.add_r, self.top_h = layers, target_rank, add_r, top_h
        self.init_warmup, self.incre_interval = init_warmup, incre_interval
        self.beta1, self.beta2, self.advance = beta1, beta2, advance_learn
        self.base_lr, self.coef = base_lr, reg_orth_coef
        self.total_rank = sum(int(layer.ranknum) for layer in layers)
        self.ipt = [0.0] * len(layers)
        self.exp_avg_ipt = [0.0] * len(layers)
        self.exp_avg_unc = [0.0] * len(layers)
        self.opt = TorchAdamW()

    def step(self, g, batches, lr):
        """One training step g: backward of ``batches[layer] = (x, G)``, the regulariser, then
        update_and_increase(g), then optimizer.step()."""
        grads = [layer.backward(*b) for layer, b in zip(self.layers, batches)]
        if self.coef:
            _, orth = increlora_orth_regu(self.layers, self.coef)
            for li, per in enumerate(grads):
                for i, (dA, dE, dB) in enumerate(per):
                    per[i] = (None if dA is None else dA + orth[(li, i, "A")], dE,
                              None if dB is None else dB + orth[(li, i, "B")])
        self.update_and_increase(g)
        for li, (layer, per) in enumerate(zip(self.layers, grads)):
            for i, (dA, dE, dB) in enumerate(per):
                rate = lr if layer.group[i] == 0 else self.base_lr
                for key, p, d in (("A", layer.A[i], dA), ("E", layer.E[i], dE),
                                  ("B", layer.B[i], dB)):
                    if d is not None:
                        self.opt.step((li, i, key), p, d, rate)

    def update_and_increase(self, g):
        if g == 0:
            for layer in self.layers:
                layer.add_reserve_param(self.add_r, self.advance)
                if self.advance:
                    layer.group[-self.add_r:] = [1] * self.add_r
        if self.total_rank < self.target_rank:
            for i, layer in enumerate(self.layers):
                self.ipt[i] = layer.score
                self.exp_avg_ipt[i] = (self.beta1 * self.exp_avg_ipt[i]
                                       + (1 - self.beta1) * self.ipt[i])
                self.exp_avg_unc[i] = (self.beta2 * self.exp_avg_unc[i]
                                       + (1 - self.beta2) * abs(self.ipt[i] - self.exp_avg_ipt[i]))
            if g > self.init_warmup and g % self.incre_interval == 0:
                self.increase_to_target_rank()

    def increase_to_target_rank(self):
        scores = [a * u for a, u in zip(self.exp_avg_ipt, self.exp_avg_unc)]
        k = min(self.top_h, self.target_rank - self.total_rank)
        threshold = sorted(scores, reverse=True)[k - 1]
        add_r = self.add_r
        for i, layer in enumerate(self.layers):
            if scores[i] >= threshold:
                layer.ranknum += add_r
                self.total_rank += add_r
                for j in range(len(layer.E) - add_r, len(layer.E)):
                    layer.e_grad_on[j] = True          # the reserve's E joins a new group
                    layer.group[j] = 1
                if self.advance:
                    layer.add_reserve_param(add_r, True)
                    layer.group[-add_r:] = [1] * add_r
                else:
                    for j in range(len(layer.A) - add_r, len(layer.A)):
                        layer.grad_on[j] = True
                        layer.group[j] = 1
                    layer.add_reserve_param(add_r, False)
        if self.total_rank == self.target_rank:
            for layer in self.layers:
                layer.hooked = False
                for e in layer.E[-add_r:]:
                    e[...] = 0.0
