"""``lowrank finetune/eval --task chat`` on a tiny GGUF Llama: a run prints its tokens/s and
where it saved, eval scores the saved adapter and the base, a bad line is one line naming
file:line with nothing written; LoRA+ and PEFT field names."""
import json

import pytest

from lowrank.app.cli_parser import parse
from lowrank.app.cli import main as cli_main
from tests.helpers.gguf_writer import write_tiny_gguf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatcli")
    write_tiny_gguf(root / "tiny.gguf", shape=dict(hidden=32, ffn=64))
    lines = [{"prompt": f"say {w}", "completion": w * 2} for w in "abab"] + \
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def finetune(files, out, *extra):
    return cli_main(["finetune", "--task", "chat", "--base", str(files / "tiny.gguf"),
                     "--data", str(files / "train.jsonl"), "--out", str(out),
                     "--batch-size", "2", "--no-progress", *extra])


def test_finetune_then_eval(files, tmp_path, capsys):
    assert finetune(files, tmp_path / "out", "--eval-data", str(files / "train.jsonl"),
                    "--metric", "accuracy", "--max-new-tokens", "3", "--set", "lora_alpha=32",
                    "--loraplus-lr-ratio", "4", "--targets", "q_proj,v_proj") == 0
    out = capsys.readouterr().out
    assert "train tokens/s; saved to" in out and "epoch 1:" in out and "accuracy" in out
    assert "cut 0 turn(s)" in out
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["config"]["alpha"] == 32.0 and saved["targets"] == ["q_proj", "v_proj"]
    assert cli_main(["eval", "--task", "chat", "--adapter", str(tmp_path / "out"),
                     "--data", str(files / "train.jsonl"), "--metric", "accuracy",
                     "--max-new-tokens", "3"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("loss ") and "perplexity" in line and "(" in line
    assert cli_main(["eval", "--task", "chat", "--model", str(files / "tiny.gguf"),
                     "--data", str(files / "train.jsonl")]) == 0


def test_bad_line_names_file_and_line_and_writes_nothing(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    code = cli_main(["finetune", "--task", "chat", "--base", str(files / "tiny.gguf"),
                     "--data", str(bad), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl:2:" in err[0]
    assert not (tmp_path / "out").exists()


def test_existing_run_needs_resume_or_force(files, tmp_path, capsys):
    assert finetune(files, tmp_path / "out", "--steps", "1") == 0
    assert finetune(files, tmp_path / "out", "--steps", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert finetune(files, tmp_path / "out", "--steps", "1", "--force") == 0


def test_the_one_parser_takes_the_chat_task_and_refuses_other_tasks_flags(capsys):
    """``--task chat`` is a choice of the one parser: its defaults filled in, a flag of
    another task refused in one line, and a chat flag refused for another task."""
    _, args = parse(["finetune", "--task", "chat", "--base", "smollm2", "--data", "x.jsonl",
                     "--out", "o"])
    assert (args.batch_size, args.lr, args.epochs, args.max_length, args.targets,
            args.steps) == (8, 2e-4, 1, 512, "all-linear", None)
    _, args = parse(["finetune", "--base", "b", "--out", "o"])
    assert (args.task, args.steps, args.batch_size) == ("lm", 200, 16)
    for argv, message in (
            (["finetune", "--task", "chat", "--base", "b", "--data", "x", "--out", "o",
              "--pooling", "cls"], "--pooling does not apply to --task chat"),
            (["finetune", "--base", "b", "--out", "o", "--metric", "accuracy"],
             "--metric needs --task chat"),
            (["eval", "--task", "chat", "--data", "x"],
             "needs --adapter DIR or --model BASE")):
        with pytest.raises(SystemExit):
            parse(argv)
        assert message in capsys.readouterr().err