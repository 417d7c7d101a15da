"""Greedy generation, tokens/s: lowrank's Llama through its KV cache (``models.decode``) against
transformers' ``generate`` on the same weights, interleaved rounds.

No real weights are assumed (nothing is downloaded): by default a random ``LlamaForCausalLM``
of SmolLM2-135M's shape (d 576, 9 query heads over 3 key/value heads, SwiGLU 1536, vocab
49,152, tied head; ``--layers`` of its 30) is saved with ``save_pretrained`` and loaded on both
sides; ``--model DIR`` takes a Hugging Face directory instead. float32, batch 1, greedy, the
same prompt; tokens/s counts the whole call (prefill included).

    python benchmarks/bench_llama_generate.py [--layers 30] [--prompt-len 32] [--new 32]
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

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a Hugging Face directory (default: random)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=32, help="tokens generated per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch
    import transformers
    import lowrank as lr
    from lowrank.backend import threads
    from lowrank.models import decode

    if args.threads:
        threads.set_threads(args.threads)
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(**SMOLLM2, num_hidden_layers=args.layers)
            transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
            path = tmp
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ours = lr.from_pretrained(path, dtype="float32")
    V = ours.config.vocab_size
    prompt = [int(i) for i in np.random.default_rng(0).integers(0, V, args.prompt_len)]
    prompt_t = torch.tensor([prompt])

    def run_ref():
        with torch.no_grad():
            out = ref.generate(prompt_t, max_new_tokens=args.new, do_sample=False,
                               min_new_tokens=args.new, pad_token_id=0, eos_token_id=None)
        return out[0].tolist()
    setups = {"lowrank (KV cache)": lambda: decode.generate(ours, prompt, args.new),
              "transformers": run_ref}
    outputs = {name: fn() for name, fn in setups.items()}   # warm-up, and the tokens
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, fn in setups.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    where = args.model or f"a random SmolLM2-shaped Llama with {args.layers} layers"
    print(f"greedy generation on {where}; float32, batch 1, prompt {args.prompt_len} tokens, "
          f"{args.new} new tokens per call; median of {args.rounds} interleaved rounds; "
          f"torch threads {torch.get_num_threads()}")
    speed = {}
    for name, t in times.items():
        speed[name] = args.new / statistics.median(t)
        print(f"  {name:<20} {speed[name]:8.1f} tokens/s  (rounds {args.new / max(t):.1f}-"
              f"{args.new / min(t):.1f})")
    agree = outputs["lowrank (KV cache)"] == outputs["transformers"]
    print(f"greedy tokens == transformers: {agree}")
    print(f"tokens/s lowrank / transformers = "
          f"{speed['lowrank (KV cache)'] / speed['transformers']:.2f}x")


if __name__ == "__main__":
    main()
