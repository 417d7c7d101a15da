"""``lowrank demo --task chat`` on a tiny GGUF Llama (the real run takes SmolLM2): sentiment
sentences as conversations, a zero-shot row and a trained row, the table, the plot."""
import json

from lowrank.app.chat_demo import ANSWERS, QUESTION, run_demo, sentiment_conversations
from lowrank.tasks.text_data import sentiment_split
from tests.helpers.gguf_writer import write_tiny_gguf


def test_conversations_ask_and_answer_one_word():
    train, val = sentiment_split()
    convs = sentiment_conversations(val)
    assert len(convs) == 200
    assert convs[0][0]["content"] == QUESTION + val[0].text
    assert {c[1]["content"] for c in convs} == set(ANSWERS.values())


def test_demo_rows_table_and_plot(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", shape=dict(hidden=32, ffn=64))
    results = run_demo(tmp_path / "out", variants=("lora",), train_examples=8,
                       val_examples=2, base=str(tmp_path / "tiny.gguf"), batch_size=4,
                       progress=False)
    assert [r["label"] for r in results] == ["zero-shot", "lora"]
    assert len(results[1]["curve"]) == 2 and results[0]["curve"] == []
    assert (tmp_path / "out" / "chat.png").stat().st_size > 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| zero-shot |" in table and "| lora |" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())[1]["label"] == "lora"
