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
  (``increase_to_target_rank``); the forked trainer's ``compute_svd_orth_regu``, its
  ``Multi_LambdaLR`` and ``transformers.AdamW`` (``NLU/src/transformers``);
* ReLoRA (Guitaricet/relora ``peft_pretraining/training_utils.py``):
  ``_get_cosine_schedule_with_multiple_warmups_lambda`` and ``magnitude_pruning_``, and the
  update loop of ``torchrun_main.py`` (merge at ``update_step % relora == 1``);
* Hugging Face's ``get_linear_schedule_with_warmup`` lambda.

Pinned commits (the newest of each repository when transcribed):
  Guitaricet/relora@176f37633fe02019835387258ddabcf6d91e328d
  FeiyuZhang98/IncreLoRA@51a2d734af7883ef90425206057c1ef25997b359
  IST-DASLab/RoSA@5f70c49e67a43beaa09eeeb8287d4bd3554af365
  IST-DASLab/peft-rosa@810da6a13f7bf3f38bc10778d589a4342351e846
  TsinghuaC3I/SoRA@c275ac237b68b888a918cf9dad36d3827e46f616
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["sparse_adamw_step", "sora_loss_term", "relora_lr_lambda", "relora_lr_lambda_may2023",
           "ReLoraOfficialLoop", "magnitude_pruning_", "hf_linear_lambda", "rosa_forward",
           "rosa_mask", "TorchAdamW", "HFAdamW", "MultiLambdaLR", "rosa_official_run",
           "NaiveIncreLoraLayer", "increlora_orth_regu", "compute_svd_orth_regu",
           "NaiveIncreLoraTrainer"]


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
# Guitaricet/relora@176f376 peft_pretraining/training_utils.py:
#   _get_cosine_schedule_with_multiple_warmups_lambda
def relora_lr_lambda(current_step, *, num_training_steps, first_warmup_steps,
                     restart_warmup_steps, restart_every, min_lr_ratio, adjust_step=0):
    assert 0 < min_lr_ratio <= 1.0, "min_lr_ratio must be in (0,1]"
    assert restart_every > 0, "restart_every must be positive"
    assert adjust_step + first_warmup_steps <= num_training_steps
    assert adjust_step + first_warmup_steps <= restart_every
    if current_step < first_warmup_steps:
        return float(current_step) / float(max(1, first_warmup_steps))
    _current_step = current_step + adjust_step
    restart_step = _current_step % restart_every
    restart_number = _current_step // restart_every
    if restart_step < restart_warmup_steps and current_step >= restart_every:
        end_of_warmup_progress = (
            float(restart_number * restart_every + restart_warmup_steps - first_warmup_steps)
            / float(max(1, num_training_steps - first_warmup_steps)))
        _cosine_decay = 0.5 * (1.0 + math.cos(math.pi * end_of_warmup_progress))
        warmup_lr_multiplier = min_lr_ratio + (1.0 - min_lr_ratio) * _cosine_decay
        return float(restart_step) / float(max(1, restart_warmup_steps)) * warmup_lr_multiplier
    progress = (float(_current_step - first_warmup_steps)
                / float(max(1, num_training_steps - first_warmup_steps)))
    cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay


# the same function as of May 2023 (before the September 2023 change): lowrank's "official_2023"
def relora_lr_lambda_may2023(current_step, *, num_training_steps, first_warmup_steps,
                             restart_warmup_steps, restart_every, min_lr_ratio):
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


# Guitaricet/relora@176f376 peft_pretraining/training_utils.py:magnitude_pruning_
def magnitude_pruning_(tensor, prune_ratio):
    """In place; torch.quantile runs on a float32 copy (linear interpolation)."""
    tensor_magnitude = np.abs(tensor)
    threshold = np.float64(np.quantile(tensor_magnitude.reshape(-1).astype(np.float32),
                                       np.float32(prune_ratio)))
    mask = tensor_magnitude > threshold
    tensor *= mask


class ReLoraOfficialLoop:
    """torchrun_main.py@176f376's update loop on one ReLoRaLinear (loss Σ G ⊙ y, no
    accumulation, no clipping, relora = cycle_length = K, torch AdamW, the cosine_restarts
    scheduler, ``optimizer_magnitude_pruning``): optimizer.step(); scheduler.step();
    update_step += 1; then at ``update_step % K == 1`` (once ``update_step >= K``):
    ``merge_and_reinit`` (W += s·B A, A re-drawn: ``new_A()``, B = 0) and ``optimizer_reset``
    (magnitude pruning of exp_avg and exp_avg_sq of A and B)."""

    def __init__(self, W, A, B, scaling, *, lr, K, lr_lambda, prune_ratio, new_A):
        self.W, self.A, self.B = _host64(W), _host64(A), _host64(B)
        self.scaling, self.lr, self.K, self.lr_lambda = scaling, lr, K, lr_lambda
        self.prune_ratio, self.new_A = prune_ratio, new_A
        self.opt = TorchAdamW(lr=lr)
        self.update_step = 0
        self.local_step = 0

    def step(self, x, G):
        x, G = _host64(x), _host64(G)
        self.local_step += 1
        dB = self.scaling * G.T @ (x @ self.A.T)
        dA = (self.scaling * G @ self.B).T @ x
        rate = self.lr * self.lr_lambda(self.update_step)   # LambdaLR: last_epoch = update_step
        self.opt.step("A", self.A, dA, rate)
        self.opt.step("B", self.B, dB, rate)
        self.update_step += 1
        can_reset = self.local_step >= self.K
        if can_reset and self.update_step % self.K == 1:
            self.W += self.scaling * self.B @ self.A
            self.A[...] = _host64(self.new_A())
            self.B[...] = 0.0
            for key in ("A", "B"):
                st = self.opt.state[key]
                for name in ("m", "v"):
                    magnitude_pruning_(st[name], self.prune_ratio)
            return True
        return False


# huggingface/transformers optimization.py:get_linear_schedule_with_warmup's lr_lambda (the
# IncreLoRA fork's get_lr_lambda, NLU/src/transformers/optimization.py@51a2d73, is the same)
def hf_linear_lambda(current_step, num_warmup_steps, num_training_steps):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - current_step)
               / float(max(1, num_training_steps - num_warmup_steps)))


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


# composer's LinearWithWarmupScheduler (the RoSA configs' ``linear_decay_with_warmup``,
# IST-DASLab/RoSA@5f70c49 scripts/train/yamls/7b_rosa_*.yaml: alpha_f 0), t_max = max_duration
def composer_linear_with_warmup(t, t_warmup, t_max, alpha_i=1.0, alpha_f=0.0):
    if t < t_warmup:
        return 0.0 + (alpha_i - 0.0) * (t / t_warmup)
    frac_of_total = min(1.0, (t - t_warmup) / (t_max - t_warmup))
    return alpha_i + (alpha_f - alpha_i) * frac_of_total


def rosa_official_run(W0, A0, B0, scaling, batches, *, density, warmup, collect, lr,
                      lr_warmup, steps, grad_acc_mode="mean_squared", lora_lr=None):
    """IST-DASLab/RoSA@5f70c49 scripts/train/scripts/restarter_llama2.sh on one linear layer
    (loss Σ G ⊙ y per step, so dL/dy = G; no dropout, no clipping): two ``composer train.py``
    runs with the same seed and ``max_duration`` T. Run 1 trains LoRA for ``warmup +
    collect`` steps on the seed's batches 0, 1, …, collecting each backward's Gᵀx during the
    last ``collect`` (peft-rosa@810da6a hooks.py:ManualGradCollectorHook), saves the mask and
    halts (``terminate_after_mask_generation``). Run 2 is a new process: the initial A0, B0,
    S = 0 on the mask, a fresh optimizer, the seed's batches from 0 again, the schedule from
    0. Both schedule over T = ``steps - warmup - collect`` (``lowrank``'s ``steps`` counts
    both runs). ``batches[t]``: the seed's t-th batch, a list of micro-batches ``(x, G)``.
    Returns run 2's ``[(A, B, S)]`` after each of its steps."""
    first = warmup + collect
    T = steps - first

    def rate(t):
        return lr * composer_linear_with_warmup(t, lr_warmup, T)

    W0 = _host64(W0)
    ratio = 1.0 if lora_lr is None else lora_lr / lr
    A, B = _host64(A0), _host64(B0)
    opt, grads = TorchAdamW(), []
    for t in range(first):                       # run 1: LoRA (+ gradient collection)
        dA, dB = 0.0, 0.0
        for x, G in batches[t]:
            x, G = _host64(x), _host64(G)
            dB = dB + scaling * G.T @ (x @ A.T)
            dA = dA + (scaling * G @ B).T @ x
            if t >= warmup:
                grads.append(G.T @ x)                # one per backward (micro-batch)
        opt.step("A", A, dA, rate(t) * ratio)
        opt.step("B", B, dB, rate(t) * ratio)
    mask = rosa_mask(grads, density, grad_acc_mode)
    A, B, S = _host64(A0), _host64(B0), np.zeros_like(W0)
    opt, out = TorchAdamW(), []
    for t in range(T):                           # run 2: a fresh process
        dA, dB, dS = 0.0, 0.0, 0.0
        for x, G in batches[t]:
            x, G = _host64(x), _host64(G)
            dB = dB + scaling * G.T @ (x @ A.T)
            dA = dA + (scaling * G @ B).T @ x
            dS = dS + np.where(mask, G.T @ x, 0.0)
        opt.step("A", A, dA, rate(t) * ratio)
        opt.step("B", B, dB, rate(t) * ratio)
        values = S[mask]
        opt.step("S", values, dS[mask], rate(t))
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


# FeiyuZhang98/IncreLoRA@51a2d73 NLU/src/transformers/trainer.py:Trainer.compute_svd_orth_regu
def compute_svd_orth_regu(layers):
    """``(regu_loss, {(layer, 'A'|'B'): d regu_loss / d cat(...)})`` (the caller multiplies by
    ``reg_orth_coef``, as compute_loss does): per layer ‖cat(A) cat(A)ᵀ - I‖_F +
    ‖cat(B)ᵀ cat(B) - I‖_F, over num_param = 2 per layer."""
    regu_loss, num_param, grads = None, 0, {}

    def compute_regu(para_cov):
        I = np.eye(*para_cov.shape)
        return np.sqrt(((para_cov - I) ** 2).sum()), para_cov - I

    for li, layer in enumerate(layers):
        wA = np.concatenate(layer.A, 0)
        wB = np.concatenate(layer.B, 1)
        nA, MA = compute_regu(wA @ wA.T)
        nB, MB = compute_regu(wB.T @ wB)
        regu_loss = nA if regu_loss is None else regu_loss + nA
        regu_loss += nB
        grads[(li, "A")] = (2.0 / nA) * MA @ wA      # d‖M‖/dA, M = A Aᵀ - I
        grads[(li, "B")] = (2.0 / nB) * wB @ MB
        num_param += 2
    return regu_loss / num_param, {k: g / num_param for k, g in grads.items()}


# FeiyuZhang98/IncreLoRA@51a2d73 NLU/src/transformers/optimization.py:AdamW.step
class HFAdamW:
    """transformers.AdamW over param groups ``{"params": [key], "lr", "weight_decay"}``;
    ``params``: key -> array (updated in place); a key without a gradient is skipped."""

    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 correct_bias=True):
        self.defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                         "correct_bias": correct_bias}
        self.param_groups = []
        for g in groups:
            self.add_param_group(g)
        self.state: dict = {}

    def add_param_group(self, group):
        self.param_groups.append({**self.defaults, **group})

    def step(self, params, grads):
        for group in self.param_groups:
            for key in group["params"]:
                if grads.get(key) is None:
                    continue
                p, grad = params[key], grads[key]
                state = self.state.setdefault(key, {})
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = np.zeros_like(p)
                    state["exp_avg_sq"] = np.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg *= beta1
                exp_avg += (1.0 - beta1) * grad
                exp_avg_sq *= beta2
                exp_avg_sq += (1.0 - beta2) * grad * grad
                denom = np.sqrt(exp_avg_sq) + group["eps"]
                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** state["step"]
                    bias_correction2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                p += -step_size * (exp_avg / denom)
                if group["weight_decay"] > 0.0:
                    p += (-group["lr"] * group["weight_decay"]) * p


# FeiyuZhang98/IncreLoRA@51a2d73 NLU/src/transformers/optimization.py:Multi_LambdaLR (over
# get_lr_lambda), with torch's LambdaLR around it: __init__ steps once (last_epoch 0)
class MultiLambdaLR:
    def __init__(self, optimizer, get_lr_lambda, num_warmup_steps, num_training_steps):
        self.optimizer, self.get_lr_lambda = optimizer, get_lr_lambda
        self.num_warmup_steps, self.num_training_steps = num_warmup_steps, num_training_steps
        lr_lambda = get_lr_lambda(num_warmup_steps, num_training_steps)
        self.group_steps = [-1] * len(optimizer.param_groups)
        self.lr_lambdas = [lr_lambda] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def check_new_params(self):
        if len(self.optimizer.param_groups) == len(self.group_steps):
            return
        assert len(self.optimizer.param_groups) - len(self.group_steps) == 1
        self.group_steps.append(-1)
        self.lr_lambdas.append(self.get_lr_lambda(self.num_warmup_steps,
                                                  self.num_training_steps - self.last_epoch))
        group = self.optimizer.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        self.base_lrs.append(group["initial_lr"])

    def get_lr(self):
        self.check_new_params()
        self.group_steps = [step + 1 for step in self.group_steps]
        return [base_lr * lmbda(step)
                for lmbda, base_lr, step in zip(self.lr_lambdas, self.base_lrs, self.group_steps)]

    def step(self):
        self.last_epoch += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr


def _get_lr_lambda(num_warmup_steps, num_training_steps):
    return lambda current_step: hf_linear_lambda(current_step, num_warmup_steps,
                                                 num_training_steps)


class NaiveIncreLoraTrainer:
    """The forked Hugging Face Trainer's step (NLU/src/transformers/trainer.py@51a2d73, the loop
    of ``train``): loss + reg_orth_coef · compute_svd_orth_regu → backward → (clip: none here)
    → ``rankallocator.update_and_increase(model, global_step, optimizer)`` → optimizer.step()
    → lr_scheduler.step(). Optimizer transformers.AdamW; scheduler
    ``get_linear_schedule_with_warmup(..., multi_lr=True)``, i.e. Multi_LambdaLR. The
    allocator is loralib/loralib/increlora.py:RankAllocator (update_ipt,
    increase_to_target_rank)."""

    def __init__(self, layers, *, target_rank, add_r, top_h, init_warmup, incre_interval,
                 beta1, beta2, advance_learn, lr, warmup, total_steps, reg_orth_coef,
                 weight_decay=0.0):
        self.layers, self.target_rank, self.add_r, self.top_h = layers, target_rank, add_r, top_h
        self.init_warmup, self.incre_interval = init_warmup, incre_interval
        self.beta1, self.beta2, self.advance = beta1, beta2, advance_learn
        self.coef, self.weight_decay = reg_orth_coef, weight_decay
        self.total_rank = sum(int(layer.ranknum) for layer in layers)
        self.exp_avg_ipt = [0.0] * len(layers)
        self.exp_avg_unc = [0.0] * len(layers)
        first = [(li, 0, k) for li in range(len(layers)) for k in "AEB"]
        self.optimizer = HFAdamW([{"params": first}], lr=lr, weight_decay=weight_decay)
        self.scheduler = MultiLambdaLR(self.optimizer, _get_lr_lambda, warmup, total_steps)

    def params(self):
        return {(li, i, k): t for li, layer in enumerate(self.layers)
                for k, ts in (("A", layer.A), ("E", layer.E), ("B", layer.B))
                for i, t in enumerate(ts)}

    def step(self, global_step, batches):
        grads = {}
        for li, (layer, b) in enumerate(zip(self.layers, batches)):
            for i, (dA, dE, dB) in enumerate(layer.backward(*b)):
                grads[(li, i, "A")], grads[(li, i, "E")], grads[(li, i, "B")] = dA, dE, dB
        if self.coef:
            _, orth = compute_svd_orth_regu(self.layers)
            for li, layer in enumerate(self.layers):
                row = 0
                for i, a in enumerate(layer.A):
                    k = a.shape[0]
                    for key, g in (("A", orth[(li, "A")][row:row + k]),
                                   ("B", orth[(li, "B")][:, row:row + k])):
                        if grads[(li, i, key)] is not None:   # requires_grad
                            grads[(li, i, key)] = grads[(li, i, key)] + self.coef * g
                    row += k
        self.update_and_increase(global_step)
        self.optimizer.step(self.params(), grads)
        self.scheduler.step()

    def update_and_increase(self, global_step):
        add_r = self.add_r
        if global_step == 0:
            new_param_list = []
            for li, layer in enumerate(self.layers):
                start = len(layer.A)
                layer.add_reserve_param(add_r, self.advance)
                new_param_list += [(li, j, k) for k in "AB" for j in range(start, start + add_r)]
            if self.advance:
                self.optimizer.add_param_group({"params": new_param_list,
                                                "weight_decay": self.weight_decay})
        if self.total_rank < self.target_rank:
            for i, layer in enumerate(self.layers):   # update_ipt
                ipt = layer.score
                self.exp_avg_ipt[i] = self.beta1 * self.exp_avg_ipt[i] + (1 - self.beta1) * ipt
                self.exp_avg_unc[i] = (self.beta2 * self.exp_avg_unc[i]
                                       + (1 - self.beta2) * abs(ipt - self.exp_avg_ipt[i]))
            if global_step > self.init_warmup and global_step % self.incre_interval == 0:
                self.increase_to_target_rank()

    def increase_to_target_rank(self):
        all_is = [a * u for a, u in zip(self.exp_avg_ipt, self.exp_avg_unc)]
        k = min(self.top_h, self.target_rank - self.total_rank)
        increase_threshold = sorted(all_is, reverse=True)[k - 1]
        new_param_list, add_r = [], self.add_r
        for li, layer in enumerate(self.layers):
            if all_is[li] >= increase_threshold:
                layer.ranknum += add_r
                self.total_rank += add_r
                n = len(layer.E)
                for j in range(n - add_r, n):
                    layer.e_grad_on[j] = True
                    new_param_list.append((li, j, "E"))
                if self.advance:
                    layer.add_reserve_param(add_r, True)
                    n = len(layer.A)
                    new_param_list += [(li, j, "A") for j in range(n - add_r, n)]
                    new_param_list += [(li, j, "B") for j in range(n - add_r, n)]
                else:
                    n = len(layer.A)
                    for j in range(n - add_r, n):
                        layer.grad_on[j] = True
                        new_param_list.append((li, j, "A"))
                    for j in range(n - add_r, n):
                        new_param_list.append((li, j, "B"))
                    layer.add_reserve_param(add_r, False)
        self.optimizer.add_param_group({"params": new_param_list,
                                        "weight_decay": self.weight_decay})
        if self.total_rank == self.target_rank:
            for layer in self.layers:
                layer.hooked = False
                for e in layer.E[-add_r:]:
                    e[...] = 0.0
