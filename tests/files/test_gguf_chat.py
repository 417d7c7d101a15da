"""``lowrank chat`` / ``generate --chat`` on a tiny GGUF model: the answers are what the
template and the KV-cache generation give, and the conversation keeps every turn."""
import io
import sys

import pytest

pytest.importorskip("gguf")
from gguf_writer import write_tiny_gguf  # noqa: E402

import lowrank as lr  # noqa: E402
from lowrank.text.chat_template import ChatTemplate  # noqa: E402
from lowrank.app.cli import main  # noqa: E402
from lowrank.models.decode import stream  # noqa: E402

NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def _expected(path, lines, system=None):
    """The answers, generated turn by turn with the whole conversation in the template."""
    model, tok = lr.from_pretrained(path), lr.Tokenizer.from_pretrained(path)
    template = ChatTemplate.from_pretrained(path)
    stop = template.stop_ids(tok)
    messages = [] if system is None else [{"role": "system", "content": system}]
    answers = []
    for line in lines:
        messages.append({"role": "user", "content": line})
        ids = template.encode(tok, messages, add_generation_prompt=True).tolist()
        reply = [t for t in stream(model, ids, NEW, stop_ids=stop) if t not in stop]
        answers.append(tok.decode(reply))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_chat_keeps_the_conversation(tiny, monkeypatch, capsys):
    lines = ["the hat", "and the shoe?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n\n"))
    assert main(["chat", "--model", str(tiny), "--max-new-tokens", str(NEW),
                 "--system", "be brief"]) == 0
    answers = _expected(tiny, lines, system="be brief")
    assert capsys.readouterr().out == "".join(a + "\n" for a in answers)
    assert answers[1] != _expected(tiny, lines[1:], system="be brief")[0]   # history matters


def test_generate_chat_answers_one_message(tiny, capsys):
    assert main(["generate", "--model", str(tiny), "--chat", "the hat",
                 "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == _expected(tiny, ["the hat"])[0] + "\n"


def test_chat_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "none.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GGUF file not found" in err[0]


def test_chat_with_an_adapter(tiny, tmp_path, monkeypatch, capsys):
    import numpy as np
    model = lr.from_pretrained(tiny)
    lr.adapters.inject(model, lr.adapters.config("lora", r=4, alpha=8), ["q_proj", "v_proj"])
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:   # B starts at zero: make the adapter matter
            p.data = rng.standard_normal(p.shape).astype(p.data.dtype) * 0.5
    lr.adapters.save_pretrained(model, tmp_path / "adapter")
    tok, template = lr.Tokenizer.from_pretrained(tiny), ChatTemplate.from_pretrained(tiny)
    ids = template.encode(tok, [{"role": "user", "content": "the hat"}], True).tolist()
    stop = template.stop_ids(tok)
    answer = tok.decode([t for t in stream(model, ids, NEW, stop_ids=stop) if t not in stop])
    assert answer != _expected(tiny, ["the hat"])[0]   # the adapter changes the answer
    monkeypatch.setattr(sys, "stdin", io.StringIO("the hat\n"))
    assert main(["chat", "--model", str(tiny), "--adapter", str(tmp_path / "adapter"),
                 "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == answer + "\n"
