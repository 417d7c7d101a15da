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
                      lr_warmup, steps, grad_acc_mode="mean_squared"):
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
    opt, grads, first = TorchAdamW(), [], warmup + collect
    for t in range(first):                       # run 1: LoRA (+ gradient collection)
        x, G = (_host64(a) for a in batches[t])
        u = x @ A.T
        dB, dA = scaling * G.T @ u, (scaling * G @ B).T @ x
        if t >= warmup:
            grads.append(G.T @ x)
        opt.step("A", A, dA, lr_at(t, steps))
        opt.step("B", B, dB, lr_at(t, steps))
    mask = rosa_mask(grads, density, grad_acc_mode)
    A, B, S = _host64(A0), _host64(B0), np.zeros_like(W0)
    opt, out, total = TorchAdamW(), [], steps - first
    for i in range(total):                       # run 2: fresh LoRA, optimizer, schedule
        x, G = (_host64(a) for a in batches[first + i])
        u = x @ A.T
        dB, dA = scaling * G.T @ u, (scaling * G @ B).T @ x
        dS = np.where(mask, G.T @ x, 0.0)
        rate = lr_at(i, total)
        opt.step("A", A, dA, rate)
        opt.step("B", B, dB, rate)
        values = S[mask]
        opt.step("S", values, dS[mask], rate)
        S[mask] = values
        out.append((A.copy(), B.copy(), S.copy()))
    return out
