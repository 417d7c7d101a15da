"""Chat data: both JSONL shapes, labels on the assistant's tokens only (end of turn included),
turns cut by max_length counted, bad lines named by file:line, batches keep the contract."""
import json

import numpy as np
import pytest

from lowrank.models.labelled_loss import IGNORE
from lowrank.tasks.chat_data import (ChatData, encode_conversations, pad_rows, read_jsonl)
from lowrank.text.chat_template import ChatTemplate
from lowrank.text.tokenizer import Tokenizer
from tests.helpers.gguf_writer import write_tiny_gguf

CONVERSATION = [{"role": "system", "content": "be short"},
                {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and so"},
                {"role": "assistant", "content": "ok then"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny.gguf"
    write_tiny_gguf(path, shape=dict(hidden=32, ffn=64))
    return Tokenizer.from_pretrained(str(path)), ChatTemplate.from_pretrained(str(path))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def labelled_text(tok, targets):
    return tok.decode(targets[targets >= 0])


def test_both_shapes_read_alike(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"messages": CONVERSATION}), "",
        json.dumps({"prompt": "p", "completion": "c"})])
    convs = read_jsonl(path)
    assert convs[0] == CONVERSATION
    assert convs[1] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages\\[0\\]"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"prompt": "x"}', "'completion' must be a string"),
    ('{"text": "x"}', "needs 'messages'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": "b"}', line])
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        read_jsonl(path)


def test_non_utf8_and_empty(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\xfe\n')
    with pytest.raises(ValueError, match="x.jsonl:2: not UTF-8"):
        read_jsonl(path)
    with pytest.raises(ValueError, match="no conversation"):
        read_jsonl(write_lines(tmp_path / "e.jsonl", ["", "  "]))


def test_labels_are_the_assistant_turns_with_their_end_of_turn(tiny):
    tok, template = tiny
    (ids, targets), = encode_conversations(template, tok, [CONVERSATION], 512)[0]
    assert labelled_text(tok, targets) == "hello<|im_end|>ok then<|im_end|>"
    # the naive rule: position t predicts token t+1; everything else is ignored
    keep = targets >= 0
    assert np.array_equal(targets[:-1][keep[:-1]], ids[1:][keep[:-1]])
    assert targets[-1] == IGNORE
    # the prompt (system, user, the assistant header) never carries a label
    opened = template.encode(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert (targets[:len(opened) - 1] == IGNORE).all()


def test_max_length_cuts_are_counted(tiny):
    tok, template = tiny
    ids_full = template.encode(tok, CONVERSATION)
    rows, report = encode_conversations(template, tok, [CONVERSATION], len(ids_full) - 3)
    assert report.turns_cut == 1 and report.assistant_turns_cut == 1
    assert labelled_text(tok, rows[0][1]).startswith("hello<|im_end|>")
    rows, report = encode_conversations(template, tok, [CONVERSATION, CONVERSATION], 4)
    assert rows == [] and report.conversations_dropped == 2 and report.turns_cut == 10
    assert "cut 10 turn(s) (4 of the assistant)" in report.line("train")


def test_batches_keep_the_trainer_contract(tiny):
    tok, template = tiny
    convs = [CONVERSATION, [{"role": "user", "content": "x"},
                            {"role": "assistant", "content": "y"}]]
    data = ChatData.from_conversations(template, tok, {"train": convs}, 512)
    batch = data.batch("train", 2, np.random.default_rng(0))
    assert batch.num_rows == 2 and batch.tokens == batch.ids.size
    ids, targets, mask = batch.args
    assert ids.shape == targets.shape == mask.shape
    assert (targets[mask == 0] == IGNORE).all()          # padding is never a label
    half = batch.take(0, 1)
    assert half.num_rows == 1 and half.ids.shape[1] == ids.shape[1]
    state = data.state_dict()
    again = ChatData.from_conversations(template, tok, {"train": convs}, 512)
    again.load_state_dict(state)
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(data.batch("train", 1, rng1).ids, again.batch("train", 1, rng2).ids)
    assert pad_rows([(ids[0], targets[0])], 0).labels == int((targets[0] >= 0).sum())


def test_smollm2_template_labels(tmp_path):
    """The real template adds a default system prompt; the labels are still the answer."""
    try:
        tok = Tokenizer.from_pretrained("smollm2")
        template = ChatTemplate.from_pretrained("smollm2")
    except (ValueError, FileNotFoundError) as exc:
        pytest.skip(f"SmolLM2 not installed: {exc}")
    convs = [[{"role": "user", "content": "Is this review positive or negative?\n\ngreat"},
              {"role": "assistant", "content": "positive"}], CONVERSATION]
    rows, _ = encode_conversations(template, tok, convs, 512)
    assert labelled_text(tok, rows[0][1]) == "positive<|im_end|>"
    assert labelled_text(tok, rows[1][1]) == "hello<|im_end|>ok then<|im_end|>"
