"""SmolLM2-135M-Instruct (Q4_1 GGUF) kept quantized vs dequantised, and its exports read back
(docs/gguf.md#kept-quantized, docs/export.md).

``memory``: each setup (``float``: the dequantised base; ``keep``: ``quantize_base(model,
"keep")``) runs in its own process: LoRA r=8 on every linear of every layer, a few SGD steps on
random tokens (B=4, T=64); reported: bytes the frozen base holds, the process's peak RSS, the
peak RSS during the steps alone (VmHWM reset through /proc/self/clear_refs after loading), the
median step time; then the ratios, measured side by side in one run.

``roundtrip``: a LoRA adapter with random non-zero factors over the same base, exported as
``hf``, ``gguf`` F32 and Q8_0, and ``peft``; transformers (and PEFT) read each back and their
logits are compared with lowrank's merged (adapted) logits on 20 prompts: max relative error
and greedy continuations (8 tokens) equal; the ``gguf`` package's reader opens every file.

    python benchmarks/bench_gguf_keep.py memory
    python benchmarks/bench_gguf_keep.py roundtrip [DIR]   # DIR: an earlier run's exports
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["The capital of France is", "Water boils at", "My favourite colour is",
           "Once upon a time", "The quick brown fox", "In 1969, humans", "Python is a",
           "The best way to learn", "Cats and dogs", "The sun rises in the",
           "A healthy breakfast", "Mount Everest is", "The meaning of life",
           "To make tea, first", "The largest ocean is", "Music can", "Rain falls when",
           "A good friend", "Computers use", "The moon orbits"]


def _peak_kb(field="VmHWM") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(mode: str, steps: int) -> dict:
    import numpy as np
    import lowrank as lr
    from lowrank import backend
    from lowrank.quant import base_bytes
    model = lr.from_pretrained("smollm2")
    lr.adapters.inject(model, lr.adapters.config("lora", r=8, alpha=16.0), TARGETS, seed=0)
    report = lr.quantize_base(model, "keep") if mode == "keep" else None
    held = base_bytes(model)
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := current RSS
    rng = np.random.default_rng(0)
    ids = backend.asarray(rng.integers(0, 49152, (4, 65)))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.zero_grad()
        loss, cache = model.loss(ids[:, :-1], ids[:, 1:])
        model.loss_backward(cache)
        for p in model.parameters(trainable_only=True):
            p.data -= 1e-3 * p.grad
        times.append(time.perf_counter() - t0)
    import resource
    return {"mode": mode, "base_kept_bytes": held["kept"], "base_float_bytes": held["float"],
            "steps_peak_mb": _peak_kb() / 1024, "process_peak_mb":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": sorted(times[1:])[len(times[1:]) // 2], "loss": float(loss),
            "kept": None if report is None else {k: report[k] for k in ("modules", "types",
                                                                         "bits_per_weight")}}


def memory(steps: int = 4) -> None:
    results = {}
    for mode in ("float", "keep", "float", "keep"):   # interleaved: load drifts cancel
        out = subprocess.run([sys.executable, __file__, "child", mode, str(steps)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.setdefault(mode, []).append(r)
        print(json.dumps(r))
    f, k = results["float"], results["keep"]
    float_base = f[0]["base_float_bytes"] + f[0]["base_kept_bytes"]
    kept_base = k[0]["base_float_bytes"] + k[0]["base_kept_bytes"]
    step = lambda rs: min(r["step_s"] for r in rs)   # noqa: E731
    print(f"base bytes: float32 {float_base / 2**20:.1f} MiB, kept {kept_base / 2**20:.1f} MiB "
          f"= {kept_base / float_base:.3f}x")
    print(f"peak RSS during steps: float {f[0]['steps_peak_mb']:.0f} MB, kept "
          f"{k[0]['steps_peak_mb']:.0f} MB; process peak: float {f[0]['process_peak_mb']:.0f} "
          f"MB, kept {k[0]['process_peak_mb']:.0f} MB")
    print(f"step time (best median of 2 runs): float {step(f):.3f} s, kept {step(k):.3f} s, "
          f"ratio kept/float {step(k) / step(f):.2f}; loss float {f[0]['loss']:.6f} kept "
          f"{k[0]['loss']:.6f}")


def _greedy(generate, ids, n=8):
    return list(generate(ids, n))[len(ids):]


def roundtrip(reuse: str | None = None) -> None:
    import numpy as np
    import torch
    import transformers
    import peft
    import gguf
    import lowrank as lr
    from lowrank import backend
    from lowrank.app.export import export
    from lowrank.files.locate import smollm2_file
    from lowrank.models.decode import generate
    tmp = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="lowrank-export-"))
    model = lr.from_pretrained("smollm2")
    lr.adapters.inject(model, lr.adapters.config("lora", r=8, alpha=16.0), TARGETS, seed=0)
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters(trainable_only=True):
        p.data += backend.asarray(0.02 * rng.standard_normal(p.shape), dtype=p.dtype)
    if not reuse:
        lr.save_pretrained(model, tmp / "adapter")
    tok = lr.Tokenizer.from_pretrained("smollm2")
    prompts = [tok.encode(p).tolist() for p in PROMPTS]

    def ours(ids, n):
        return generate(model, ids, n)

    def theirs_of(hf):
        def run(ids, n):
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            return out[0].tolist()
        return run
    reference = {}
    adapted_logits = [backend.to_numpy(model.forward(backend.asarray(np.asarray([p])))[0])[0]
                      for p in prompts]
    for fmt, qtype, name in (("peft", None, "peft"), ("hf", None, "hf"),
                             ("gguf", "F32", "m.f32.gguf"), ("gguf", "Q8_0", "m.q8_0.gguf")):
        if reuse:
            continue
        t0 = time.perf_counter()
        report = export("smollm2", tmp / "adapter", tmp / name, fmt, qtype or "F32")
        print(f"export {fmt} {qtype or ''}: {time.perf_counter() - t0:.1f} s; "
              + " | ".join(report.get("notes", [])))
    # the adapted (unmerged) model vs transformers + PEFT over transformers' own GGUF base
    base_file = smollm2_file()
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(
        str(base_file.parent), gguf_file=base_file.name, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp / "peft").eval()
    _compare("peft (adapted)", adapted, prompts, adapted_logits, ours, theirs_of, _greedy)
    lr.adapters.merge_and_unload(model)
    merged_logits = [backend.to_numpy(model.forward(backend.asarray(np.asarray([p])))[0])[0]
                     for p in prompts]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
    reference["hf"] = _compare("hf directory", hf, prompts, merged_logits, ours, theirs_of,
                               _greedy)
    f32 = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp), gguf_file="m.f32.gguf", dtype=torch.float32)
    _compare("gguf F32", f32, prompts, merged_logits, ours, theirs_of, _greedy)
    q8 = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp), gguf_file="m.q8_0.gguf", dtype=torch.float32)
    _compare("gguf Q8_0 (vs merged float32)", q8, prompts, merged_logits, ours, theirs_of,
             _greedy)
    for name in ("m.f32.gguf", "m.q8_0.gguf"):
        r = gguf.GGUFReader(str(tmp / name))
        kinds = sorted({t.tensor_type.name for t in r.tensors})
        print(f"gguf reader: {name}: {len(r.tensors)} tensors ({', '.join(kinds)}), "
              f"{len(r.fields)} fields, chat template "
              f"{'present' if 'tokenizer.chat_template' in r.fields else 'MISSING'}")
    print(f"files in {tmp}")


def _compare(label, hf, prompts, ours_logits, ours, theirs_of, greedy):
    import numpy as np
    import torch
    worst = 0.0
    for p, mine in zip(prompts, ours_logits):
        with torch.no_grad():
            theirs = hf(torch.tensor([p])).logits[0].numpy()
        worst = max(worst, float(np.abs(theirs - mine).max() / np.abs(mine).max()))
    same = 0
    for p in prompts:   # transformers stops at the end-of-turn token: compare what both made
        a, b = greedy(ours, p), greedy(theirs_of(hf), p)
        same += a[:len(b)] == b[:len(a)]
    print(f"{label}: max relative logits error {worst:.2e}; greedy 8-token continuations "
          f"equal on {same}/{len(prompts)} prompts")
    return worst


if __name__ == "__main__":
    if sys.argv[1] == "child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1] == "memory":
        memory(int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    else:
        roundtrip(sys.argv[2] if len(sys.argv) > 2 else None)
