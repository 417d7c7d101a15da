"""Instruction-tuning SmolLM2-135M-Instruct: lowrank vs PyTorch+transformers+PEFT, side by side.

The recipe of ``lowrank demo --task chat`` in both libraries: the shipped sentiment sentences
as conversations ("Is this review positive or negative? ..." -> "positive"/"negative"), the
classify task's split; the same token ids and targets on both sides (rendered with the
model's chat template, labels on the assistant's tokens and its end of turn, ``IGNORE``
elsewhere: TRL's assistant-only loss), the same batch order (a PCG64(seed) permutation per
epoch, rows padded on the right to the batch's longest), AdamW (torch form) lr 5e-4, no
weight decay, 10% linear warm-up then linear decay to 0, clip 1.0; LoRA r=8, α=16, dropout
0.05 on every linear of the decoder (``all-linear``). PyTorch loads the same GGUF file
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=float32)``) and runs a
plain loop: full logits, ``cross_entropy(ignore_index=-100)``.

Each side runs in its own process (peak resident memory = its ru_maxrss), ``--threads`` BLAS
threads each. Reported: exact-match accuracy of the greedy answer on the first ``--val``
validation conversations, train tokens/s (padded B·T on both sides, over training wall time)
and per CPU-second, peak MB of the training run (lowrank's read before the head-share probe), the share of a forward+backward in the LM head with the head on
every position and on the labelled ones only, achieved GFLOP/s against a 2048² matmul in the
same process.

    python benchmarks/bench_chat.py --steps 16 --val 40 [--shards 2]
Throughput depends on machine load (the figures in docs/chat.md came from a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IGNORE = -100


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def encoded(args):
    """``(train rows, validation conversations, tokenizer, template)``, identical for both."""
    from lowrank.app.chat_demo import demo_data
    from lowrank.tasks.chat_data import encode_conversations
    from lowrank.text.chat_template import ChatTemplate
    from lowrank.text.tokenizer import Tokenizer
    tok, template = Tokenizer.from_pretrained("smollm2"), ChatTemplate.from_pretrained("smollm2")
    train, val = demo_data()
    rows, _ = encode_conversations(template, tok, train[:args.steps * args.batch_size], 256)
    return rows, val[:args.val], tok, template


def batches(rows, args):
    """The Trainer's order: a PCG64(seed) permutation, consecutive batches of it."""
    import numpy as np
    from lowrank.tasks.chat_data import pad_rows
    order = np.random.Generator(np.random.PCG64(args.seed)).permutation(len(rows))
    for s in range(args.steps):
        yield pad_rows([rows[i] for i in order[s * args.batch_size:(s + 1) * args.batch_size]], 2)


def lr_at(step, args):
    warm = -(-args.steps // 10)
    if step < warm:
        return args.lr * step / warm
    return args.lr * max(0.0, (args.steps - step) / max(1, args.steps - warm))


def flops(batch, cfg, labelled_only: bool) -> float:
    """Multiply-adds × 2 of one forward+backward: frozen linears forward and dx (4·N·P),
    attention (scores and mix: 4·B·T²·d forward, twice that backward), the head on its rows."""
    B, T = batch.ids.shape
    d, f, L, V = cfg["d"], cfg["f"], cfg["layers"], cfg["vocab"]
    kv = cfg["kv_dim"]
    P = L * (d * d * 2 + d * kv * 2 + 3 * d * f)
    rows = batch.labels if labelled_only else B * T
    return 4.0 * B * T * P + 12.0 * L * B * T * T * d + 4.0 * rows * V * d


def matmul_gflops(mm, a, b, reps=5) -> float:
    mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        mm(a, b)
    return 2.0 * a.shape[0] * a.shape[1] * b.shape[1] * reps / (time.perf_counter() - start) / 1e9


# --- lowrank -------------------------------------------------------------------------------

def run_lowrank(args) -> dict:
    import numpy as np
    import lowrank as lr
    from lowrank import backend
    from lowrank.tasks import chat
    from lowrank.tasks.chat_data import ChatData
    backend.keep_freed_host_memory()   # as the `lowrank` command does for every run
    rows, val, tok, template = encoded(args)
    model = lr.from_pretrained("smollm2")
    load_mb = peak_mb()
    chat.prepare(model, "lora", {"dropout": 0.05}, seed=args.seed)
    c = model.config
    cfg = {"d": c.hidden_size, "f": c.intermediate_size, "layers": c.num_hidden_layers,
           "vocab": c.vocab_size, "kv_dim": c.num_key_value_heads * c.head_dim}
    data = ChatData({"train": rows}, 2)
    config = chat.ChatConfig(batch_size=args.batch_size, lr=args.lr, steps=args.steps,
                             seed=args.seed, max_length=256, shards=args.shards)
    trainer = chat.make_trainer(model, data, config)
    start, cpu = time.perf_counter(), time.process_time()
    history = trainer.fit(progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = trainer.tokens_seen
    train_batches = list(batches(rows, args))
    work = sum(flops(b, cfg, True) for b in train_batches)
    real = sum(int(b.mask.sum()) for b in train_batches)
    accuracy = chat.evaluate_accuracy(model, tok, template, val, 3)["accuracy"]
    train_peak = peak_mb()   # before the probe below, whose every-row head is not the recipe's
    shares = head_shares(model, train_batches[:args.probe], cfg)
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    return {"library": "lowrank", "accuracy": accuracy, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu, "peak_mb": train_peak, "load_mb": load_mb,
            "loss": [h["loss"] for h in history], **shares, "gflops_train": work / seconds / 1e9,
            "real_token_share": real / tokens, "shards": args.shards,
            "matmul_gflops": matmul_gflops(np.matmul, a, a)}


def head_shares(model, probe, cfg) -> dict:
    """Forward+backward of ``probe`` batches, head on every row vs on the labelled ones:
    seconds in the head (its product, cross-entropy, its backward) over the whole."""
    from lowrank.ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
    xp = model.xp
    out = {}
    for mode in ("every", "labelled"):
        head_s = total_s = work = 0.0
        for batch in probe:
            ids, targets, mask = batch.args
            start = time.perf_counter()
            if mode == "labelled":
                hidden, cache = model.forward(ids, mask, logits=False)
                t0 = time.perf_counter()
                flat = targets.reshape(-1)
                rows = xp.nonzero(flat >= 0)[0]
                logits, c_head = model.head_forward(hidden.reshape(-1, hidden.shape[-1])[rows])
                loss, c_ce = cross_entropy_forward(logits[None], flat[rows][None])
                dh = model.head_backward(cross_entropy_backward(c_ce)[0], c_head)
                dhidden = xp.zeros((flat.size, hidden.shape[-1]), dtype=dh.dtype)
                dhidden[rows] = dh
                head_s += time.perf_counter() - t0
            else:
                hidden, cache = model.forward(ids, mask, logits=False)
                t0 = time.perf_counter()
                flat = targets.reshape(-1)
                rows = xp.nonzero(flat >= 0)[0]
                logits, c_head = model.head_forward(hidden.reshape(-1, hidden.shape[-1]))
                loss, c_ce = cross_entropy_forward(logits[rows][None], flat[rows][None])
                dlogits = xp.zeros_like(logits)
                dlogits[rows] = cross_entropy_backward(c_ce)[0]
                dhidden = model.head_backward(dlogits, c_head)
                head_s += time.perf_counter() - t0
            model.backward(dhidden.reshape(hidden.shape), cache)
            model.zero_grad()
            total_s += time.perf_counter() - start
            work += flops(batch, cfg, mode == "labelled")
        out[f"head_share_{mode}"] = head_s / total_s
        out[f"step_s_{mode}"] = total_s / len(probe)
        out[f"gflops_{mode}"] = work / total_s / 1e9
    return out


# --- PyTorch + transformers + PEFT ------------------------------------------------------------

def run_torch(args) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from lowrank.files.locate import smollm2_file
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rows, val, tok, template = encoded(args)
    path = smollm2_file()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    load_mb = peak_mb()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    c = model.config
    cfg = {"d": c.hidden_size, "f": c.intermediate_size, "layers": c.num_hidden_layers,
           "vocab": c.vocab_size, "kv_dim": c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)}
    model.train()
    losses, tokens, work = [], 0, 0.0
    start, cpu = time.perf_counter(), time.process_time()
    for step, batch in enumerate(batches(rows, args)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        ids, targets, mask = (torch.from_numpy(a.astype(np.int64)) for a in batch.args)
        logits = model(input_ids=ids, attention_mask=mask).logits        # (B, T, V): every row
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tokens += batch.tokens
        work += flops(batch, cfg, False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    model.eval()
    stop = template.stop_ids(tok)
    correct = 0
    with torch.no_grad():
        for messages in val:
            ids = template.encode(tok, messages[:-1], add_generation_prompt=True).tolist()
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                                 eos_token_id=stop, pad_token_id=stop[0])[0, len(ids):].tolist()
            answer = tok.decode(np.asarray([t for t in out if t not in stop], dtype=np.int64))
            correct += answer.strip() == messages[-1]["content"].strip()
    a = torch.randn(2048, 2048)
    return {"library": "pytorch+peft", "accuracy": correct / len(val),
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu,
            "peak_mb": peak_mb(), "load_mb": load_mb, "loss": losses,
            "gflops_every": work / seconds / 1e9, "matmul_gflops": matmul_gflops(torch.mm, a, a)}


# --- driver ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", type=int, default=2, help="batches timed for the head share")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1,
                        help="lowrank's batch shards (one BLAS thread each when > 1)")
    parser.add_argument("--sides", default="torch,lowrank")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = run_torch if args.worker == "torch" else run_lowrank
        print("RESULT " + json.dumps(run(args)), flush=True)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results = {}
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--worker", side] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("worker", "json", "sides") and v is not None]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{side}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[side] = json.loads(lines[-1][7:])
        print(f"{side}: {json.dumps({k: v for k, v in results[side].items() if k != 'loss'})}",
              flush=True)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def report(results, args) -> str:
    lines = [f"SmolLM2-135M-Instruct LoRA, {args.steps} steps x batch {args.batch_size}, "
             f"{args.val} validation, {args.threads} thread(s) per process",
             "| library | accuracy | train tokens/s | tokens/CPU-s | peak MB | GFLOP/s "
             "| 2048² matmul GFLOP/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        gf = r.get("gflops_train", r.get("gflops_every", float("nan")))
        lines.append(f"| {r['library']} | {r['accuracy']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_cpu_s']:,.0f} | {r['peak_mb']:,.0f} | {gf:.1f} | "
                     f"{r['matmul_gflops']:.1f} |")
    ours, theirs = results.get("lowrank"), results.get("torch")
    if ours:
        lines.append(f"\nlowrank: {ours.get('shards', 1)} batch shard(s); real tokens "
                     f"{100 * ours['real_token_share']:.1f}% of the padded B·T (what packing "
                     f"could save at most: {100 * (1 - ours['real_token_share']):.1f}%)")
        lines.append(f"lowrank head share of forward+backward: every position "
                     f"{100 * ours['head_share_every']:.1f}% -> labelled only "
                     f"{100 * ours['head_share_labelled']:.1f}% (step {ours['step_s_every']:.2f}"
                     f" s -> {ours['step_s_labelled']:.2f} s)")
    if ours and theirs:
        lines.append(f"accuracy lowrank - PyTorch+PEFT: "
                     f"{100 * (ours['accuracy'] - theirs['accuracy']):+.1f} points")
        lines.append(f"train tokens/s lowrank / PyTorch+PEFT: "
                     f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x (wall), "
                     f"{ours['tokens_per_cpu_s'] / theirs['tokens_per_cpu_s']:.2f}x (per CPU-s)")
        lines.append(f"peak RSS lowrank / PyTorch+PEFT: {ours['peak_mb'] / theirs['peak_mb']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
