"""The command line as a newcomer meets it: one parser, every subcommand listed, every flag
described with its default once, a flag of the other task answered with the task it needs,
--set read once, --json records, progress lines off a terminal, warnings for runs too short
to leave warm-up, and tables aligned for a terminal."""
import argparse
import io
import json
import re
import warnings

import pytest

from lowrank.app import cli, cli_parser
from lowrank.app.demo import terminal_table
from lowrank.training.progress import ProgressLines, progress_bar
from lowrank.tasks.classify import ClassifyConfig, short_run_note

COMMANDS = ("pretrain", "finetune", "generate", "eval", "predict", "chat", "export", "demo", "bench")


def _subparsers():
    parser = cli_parser.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_top_level_help_lists_every_subcommand():
    parser, subs = _subparsers()
    assert set(subs) == set(COMMANDS)
    text = parser.format_help()
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), command   # with its description


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_a_description_and_its_default_once(command):
    _, subs = _subparsers()
    sub = subs[command]
    text = sub.format_help()
    assert "(default: None)" not in text
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest}: no help"
        flag = action.option_strings[0] if action.option_strings else action.dest
        assert flag in text
        assert (action.help or "").count("default") <= 1
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text)


def test_the_flags_a_newcomer_looks_for_are_listed():
    _, subs = _subparsers()
    finetune = subs["finetune"].format_help()
    for flag in ("--task", "--data", "--eval-data", "--epochs", "--format", "--text-column",
                 "--label-column", "--label-names", "--max-examples", "--json", "--set"):
        assert flag in finetune, flag
    assert "--data" in subs["eval"].format_help()
    assert "--task" in subs["demo"].format_help()
    assert "sampling seed" in subs["generate"].format_help()
    assert "--seed" not in subs["eval"].format_help()           # eval samples nothing


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--base", "minilm", "--out", "o"], "add --task classify"),
    (["finetune", "--base", "b", "--data", "x.tsv", "--out", "o"], "--data needs --task classify"),
    (["finetune", "--task", "classify", "--base", "minilm", "--steps", "3", "--out", "o"],
     "--steps needs --task lm (classification trains for --epochs)"),
    (["eval", "--model", "m", "--format", "csv"], "--format describes a labelled file"),
    (["eval", "--model", "minilm"], "score a classifier with eval --data FILE --adapter DIR"),
    (["generate", "--model", "minilm"], "minilm is an encoder, not a language model"),
    (["demo", "--task", "sentiment", "--pretrain-steps", "3"], "--pretrain-steps needs"),
    (["demo", "--epochs", "2"], "--epochs needs --task sentiment"),
    (["finetune", "--base", "b", "--out", "o", "--set", "r"], "--set expects KEY=VALUE"),
])
def test_a_flag_of_the_other_task_gets_one_line_with_the_way_out(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_task_defaults_and_set_parsed_once():
    _, lm = cli_parser.parse(["finetune", "--base", "b", "--out", "o"])
    assert (lm.batch_size, lm.lr, lm.dropout, lm.weight_decay) == (16, 3e-3, 0.0, 0.0)
    _, clf = cli_parser.parse(["finetune", "--task", "classify", "--base", "minilm", "--out",
                               "o", "--set", "r=4", "--set", "init_r=6", "--variant",
                               "adalora", "--init-r", "5"])
    assert (clf.batch_size, clf.lr, clf.dropout, clf.epochs, clf.dtype) == (
        32, None, 0.1, 3, "float32")
    assert clf.variant_options == {"r": 4, "init_r": 5}        # the variant's own flag wins


def test_json_record_of_a_run(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    code = cli.main(["pretrain", "--out", str(tmp_path / "b"), "--corpus", str(corpus),
                     "--vocab-size", "300", "--context", "16", "--n-layer", "1", "--d-model",
                     "16", "--n-head", "2", "--steps", "2", "--warmup", "1", "--batch-size",
                     "2", "--no-progress", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    record = json.loads(out[0])
    assert record["command"] == "pretrain" and record["total"] > 0
    assert record["out"] == str(tmp_path / "b") and "val_loss" in record


def test_a_run_that_is_all_warm_up_is_warned(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x = 1\n" * 2000)
    with pytest.warns(UserWarning) as caught:
        code = cli.main(["pretrain", "--out", str(tmp_path / "b"), "--corpus", str(corpus),
                         "--vocab-size", "300", "--context", "16", "--n-layer", "1",
                         "--d-model", "16", "--n-head", "2", "--steps", "3", "--batch-size",
                         "2", "--no-progress"])
    assert code == 0
    line = warnings.formatwarning(caught[0].message, UserWarning, "", 0)   # as the CLI prints
    assert line.startswith("lowrank: warning: --steps 3 <= --warmup 10:") and "\n" not in line[:-1]
    assert "use --warmup 1" in line


def test_short_classification_run_note():
    note = short_run_note(24, ClassifyConfig())
    assert note.startswith("only 3 optimizer step(s) (24 examples / batch 32")
    assert "--epochs 7 --batch-size 8 gives 21 steps" in note
    assert short_run_note(1800, ClassifyConfig()) is None


def test_progress_off_a_terminal_is_a_few_lines():
    stream = io.StringIO()
    bar = ProgressLines(200, "finetune", stream=stream)
    for step in range(200):
        bar.set_postfix(loss=f"{3 - step / 100:.3f}")
        bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1] == "finetune: step 200/200  loss 1.010"
    assert "\r" not in stream.getvalue()
    assert isinstance(progress_bar(5, "x"), ProgressLines)     # pytest's stderr: no terminal


def test_terminal_table_aligns_markdown():
    md = "title\n\n| a | n |\n|---|---:|\n| long name | 1 |\n| b | 22,000 |"
    text = terminal_table(md).splitlines()
    assert text[:2] == ["title", ""] and "|" not in "".join(text)
    assert text[2] == "a               n" and text[4] == "long name       1"
    assert text[5] == "b          22,000"


def test_the_command_line_runs_one_blas_thread_unless_told():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from lowrank.backend import threads
    before = threadpoolctl.threadpool_info()
    if not any(i["user_api"] == "blas" for i in before):
        pytest.skip("no BLAS pool loaded")
    try:
        assert threads.apply_cli_default({}) == 1
        assert all(i["threads"] == 1 for i in threads.thread_info() if i["api"] == "blas")
        assert threads.apply_cli_default({"OPENBLAS_NUM_THREADS": "2"}) is None   # user's
    finally:
        threadpoolctl.threadpool_limits({i["prefix"]: i["num_threads"] for i in before})
