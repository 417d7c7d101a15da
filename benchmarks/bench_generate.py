"""Greedy generation, tokens/s: lowrank's ``generate`` with and without its KV cache against
transformers' ``generate`` (its own KV cache) on the same GPT-2 weights, interleaved.

No real GPT-2 weights are assumed on the machine (nothing is downloaded): by default a
randomly initialised GPT-2 of ``--size`` is saved with ``save_pretrained`` to a temporary
directory and loaded on both sides (``lr.from_pretrained`` / ``GPT2LMHeadModel``); give
``--model DIR`` for a real one. Both sides run float32, batch 1, greedy, the same prompt;
the first token needs the prompt's prefill, so tokens/s counts the whole call.

    python benchmarks/bench_generate.py [--size small|tiny] [--prompt-len 32] [--new 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {   # GPT-2 small's shape, and a tiny one for a quick check
    "small": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    "tiny": dict(n_embd=256, n_layer=4, n_head=4, n_positions=256, vocab_size=1024),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GPT-2 directory (default: random)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64, help="tokens generated per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch
    import transformers
    import lowrank as lr
    from lowrank import backend
    from lowrank.backend import threads
    from lowrank.models.generate import generate

    if args.threads:
        threads.set_threads(args.threads)
        torch.set_num_threads(args.threads)
    backend.keep_freed_host_memory()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(**SIZES[args.size], resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0)
            transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp)
            path = tmp
        ref = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
        ours = lr.from_pretrained(path, dtype="float32")
    V = ours.config.vocab_size
    prompt = [int(i) for i in np.random.default_rng(0).integers(0, V, args.prompt_len)]
    prompt_t = torch.tensor([prompt])

    def run_ref():
        with torch.no_grad():
            out = ref.generate(prompt_t, max_new_tokens=args.new, do_sample=False,
                               min_new_tokens=args.new, pad_token_id=0, eos_token_id=None)
        return out[0].tolist()
    setups = {"lowrank (KV cache)": lambda: generate(ours, prompt, args.new),
              "lowrank (no cache)": lambda: generate(ours, prompt, args.new, use_cache=False),
              "transformers": run_ref}
    outputs = {name: fn() for name, fn in setups.items()}   # warm-up, and the tokens
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, fn in setups.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    where = args.model or f"a random GPT-2 ({args.size}: " + ", ".join(
        f"{k}={v}" for k, v in SIZES[args.size].items()) + "), saved with save_pretrained"
    print(f"greedy generation on {where}; float32, batch 1, prompt {args.prompt_len} tokens, "
          f"{args.new} new tokens per call; median of {args.rounds} interleaved rounds; "
          f"torch threads {torch.get_num_threads()}")
    speed = {}
    for name, t in times.items():
        speed[name] = args.new / statistics.median(t)
        print(f"  {name:<20} {speed[name]:8.1f} tokens/s  (rounds {args.new / max(t):.1f}-"
              f"{args.new / min(t):.1f})")
    same = outputs["lowrank (KV cache)"] == outputs["lowrank (no cache)"]
    agree = outputs["lowrank (KV cache)"] == outputs["transformers"]
    print(f"greedy tokens: with cache == without: {same}; == transformers: {agree}")
    print(f"tokens/s lowrank (KV cache) / transformers = "
          f"{speed['lowrank (KV cache)'] / speed['transformers']:.2f}x; "
          f"KV cache speed-up over re-running the window = "
          f"{speed['lowrank (KV cache)'] / speed['lowrank (no cache)']:.2f}x")


if __name__ == "__main__":
    main()
