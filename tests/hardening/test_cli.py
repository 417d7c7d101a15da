"""Generated command lines, as careless users type them: wrong numbers, misspelt flags, files
where directories belong, another run's directory as --out, an adapter as --base, output into a
closed pipe. Each ends with exit 0, or a non-zero exit and exactly one line on stderr — never a
traceback, an internal error or a hang (time cap per case). Counts: tests/helpers/hardening.py."""
import contextlib
import io
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from lowrank.app import cli

from tests.helpers.hardening import CaseTimeout, examples, make_runs, record, time_cap

NUMBERS = ["-1", "0", "1", "2", "x", "nan", "inf", "1e38", "1000000000", "0.5", ""]
SMALL = ["-1", "0", "1", "2", "x", "1.5", ""]            # steps and sizes: never long runs
FLAGS = {
    "pretrain": {"--steps": SMALL, "--batch-size": SMALL, "--lr": NUMBERS, "--warmup": NUMBERS,
                 "--save-every": NUMBERS, "--eval-interval": SMALL, "--seed": NUMBERS,
                 "--vocab-size": ["-1", "0", "2", "300", "x", "1000000000"],
                 "--context": ["-1", "0", "8", "16", "x", "1000000000"],
                 "--n-layer": SMALL, "--n-head": ["0", "1", "2", "3", "x"],
                 "--d-model": ["0", "8", "16", "x"], "--dtype": ["float16", "float64"],
                 "--backend": ["cupy", "numpy-strict", "torch"], "--grad-clip": NUMBERS,
                 "--accum-steps": SMALL, "--weight-decay": NUMBERS},
    "finetune": {"--steps": SMALL, "--lr": NUMBERS, "--save-every": NUMBERS, "--r": SMALL,
                 "--alpha": NUMBERS, "--dropout": NUMBERS, "--seed": NUMBERS,
                 "--variant": ["lora", "dora", "adalora", "full", "nope", "lora,dora", ""],
                 "--targets": ["q,v", "nope", "(", "(.|.|.|.|.)*Z", ""],
                 "--init-r": SMALL, "--target-r": SMALL, "--set": ["r=2", "bogus=1", "x"],
                 "--init": ["pissa", "nope"], "--eval-interval": SMALL},
    "generate": {"--max-new-tokens": ["-1", "0", "3", "x"], "--temperature": NUMBERS,
                 "--top-k": NUMBERS, "--seed": NUMBERS, "--prompt": ["", "def ", "\x00é"]},
    "eval": {"--batches": ["-1", "0", "1", "x"], "--batch-size": SMALL, "--seed": NUMBERS},
}
PATHS = ["base", "ft", "fresh", "corpus", "corpus/sub", "missing", "/proc/lowrank-denied",
         "/dev/null", "base-copy"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base, ft, corpus = make_runs(tmp_path_factory.mktemp("cli-runs"))
    return base, ft, corpus


def _path(choice, root, base, ft, corpus) -> str:
    named = {"base": base, "ft": ft, "corpus": corpus, "corpus/sub": corpus / "sub",
             "fresh": root / "out", "missing": root / "missing"}
    if choice in ("base-copy", "ft-copy"):   # a run to overwrite (the originals stay intact)
        copy = root / choice
        if not copy.exists():
            shutil.copytree(base if choice == "base-copy" else ft, copy)
        return str(copy)
    return str(named.get(choice, choice))


@st.composite
def command_lines(draw, base, ft, corpus, root):
    command = draw(st.sampled_from(sorted(FLAGS)))
    argv = [command]
    path = lambda: _path(draw(st.sampled_from(PATHS)), root, base, ft, corpus)  # noqa: E731
    if command in ("pretrain", "finetune"):
        out = draw(st.sampled_from(PATHS))
        out = {"base": "base-copy", "ft": "ft-copy"}.get(out, out)
        argv += ["--out", _path(out, root, base, ft, corpus)]
        argv += ["--corpus", str(corpus), "--max-bytes", "20000", "--no-progress"]
        if command == "pretrain":
            argv += ["--vocab-size", "300", "--context", "16", "--n-layer", "1", "--d-model",
                     "16"]
        else:
            argv += ["--base", path() if draw(st.booleans()) else str(base)]
        argv += ["--steps", "1", "--batch-size", "2"]
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(["--resume", "--force"])))
    else:
        argv += ["--model", path() if draw(st.booleans()) else str(base)]
        if draw(st.booleans()):
            argv += ["--adapter", path()]
        if command == "eval":
            argv += ["--corpus", str(corpus), "--max-bytes", "20000"]
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS[command])), max_size=3)):
        argv += [flag, draw(st.sampled_from(FLAGS[command][flag]))]
    if draw(st.integers(0, 4)) == 0:   # a typo: one letter swapped or dropped
        flag = draw(st.sampled_from(sorted(FLAGS[command])))
        i = draw(st.integers(2, len(flag) - 1))
        argv += [flag[:i] + flag[i + 1:], "1"]
    return argv


class ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def run_cli(argv, broken_pipe=False):
    """``(outcome, stderr)`` of one in-process run of the command line."""
    out, err = ClosedPipe() if broken_pipe else io.StringIO(), io.StringIO()
    code = None
    try:
        with time_cap(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except CaseTimeout:
        return "hang", err.getvalue()
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:   # noqa: BLE001 - counted: the battery asserts there are none
        return "traceback", f"{type(exc).__name__}: {exc}"
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        return "ok", ""
    if code == 3:
        return "internal", err.getvalue()
    if code == 141 and broken_pipe:
        return "broken-pipe", ""
    if len(lines) != 1:
        return "multiline", err.getvalue()
    return ("stopped" if code == 1 else "refused"), lines[0]


@settings(max_examples=examples(100))
@given(data=st.data())
def test_generated_command_lines_end_in_one_line_or_success(runs, tmp_path_factory, data):
    base, ft, corpus = runs
    root = tmp_path_factory.mktemp("cli-case")
    argv = data.draw(command_lines(base, ft, corpus, root), label="argv")
    broken = argv[0] == "generate" and data.draw(st.booleans(), label="closed stdout")
    outcome, detail = run_cli(argv, broken)
    record("cli", outcome, f"{argv}: {detail}")
    shutil.rmtree(root, ignore_errors=True)


MISTAKES = [
    ["finetune", "--base", "{base}", "--out", "{base}", "--steps", "1"],
    ["pretrain", "--out", "{base}", "--steps", "1"],
    ["pretrain", "--out", "{corpus}", "--steps", "1"],
    ["pretrain", "--out", "/proc/lowrank-denied", "--steps", "1"],
    ["pretrain", "--out", "{root}/x", "--backend", "cupy", "--steps", "1"],
    ["pretrain", "--out", "{root}/x", "--context", "100000000"],
    ["finetune", "--base", "{base}", "--out", "{root}/x", "--save-every", "-1"],
    ["finetune", "--base", "{base}", "--out", "{root}/x", "--stesp", "3"],
    ["generate", "--model", "{base}", "--temperature", "-1"],
    ["generate", "--model", "{base}", "--top-k", "-1"],
    ["generate", "--model", "{base}", "--max-new-tokens", "-1"],
    ["eval", "--model", "{base}", "--batches", "0"],
    ["eval", "--model", "{root}/missing"],
    ["generate", "--model", "{corpus}"],
]


@pytest.mark.parametrize("argv", MISTAKES, ids=[" ".join(m[:4]) for m in MISTAKES])
def test_ordinary_mistakes_are_one_line(runs, tmp_path, argv):
    base, ft, corpus = runs
    argv = [a.format(base=base, corpus=corpus, root=tmp_path) for a in argv]
    before = sorted(p.name for p in base.iterdir())
    outcome, line = run_cli(argv)
    assert record("cli-fixed", outcome, f"{argv}: {line}") == "refused", line
    assert sorted(p.name for p in base.iterdir()) == before   # nothing written into the base
    if "--stesp" in argv:
        assert "did you mean --steps?" in line


def test_generate_into_a_closed_pipe_is_quiet(runs):
    base, ft, _ = runs
    outcome, _ = run_cli(["generate", "--model", str(ft), "--max-new-tokens", "3"], True)
    assert record("cli-fixed", outcome) == "broken-pipe"


def test_generate_finds_the_base_of_an_adapter_directory(runs, capsys):
    base, ft, _ = runs
    assert cli.main(["generate", "--model", str(ft), "--prompt", "def",
                     "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def")


def test_help_lists_every_field_of_the_chosen_variant(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--variant", "adalora", "--help"])
    text = capsys.readouterr().out
    for flag in ("--init-r", "--target-r", "--tinit", "--tfinal", "--deltaT", "--beta1",
                 "--orth-reg-weight", "--total-step", "--steps", "--save-every", "--force"):
        assert flag in text, flag
    assert "(default: 12)" in text and "(default: 200)" in text

