"""Run directories under concurrent writers and swaps, and the run's own inputs: two
``finetune --out same`` at once (one refuses in one line), the run directory replaced during a
run (the base is never written), a base rebuilt under its adapter (refused unless
``--allow-other-base``), the NaN stop's "last good" save (it evaluates finite), ``--regex
--targets`` (one pattern) and ``--max-bytes`` on corpus files (streamed). Counts per outcome:
tests/helpers/hardening.py."""
import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowrank.text import corpus as lr_data
from lowrank.app import workflows as wf
from lowrank.app.run_lock import RunDirectory, hold

from tests.helpers.hardening import ROOT, examples, make_runs, record

SMALL = ["--steps", "4000", "--batch-size", "2", "--no-progress"]


def _cli(*argv, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", "from lowrank.app.cli import main; "
                             "raise SystemExit(main())", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, **kw)


def _tree_digest(directory) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*")):
        h.update(str(path.relative_to(directory)).encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("dir-runs"))


def _wait_for(path, seconds=60.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


# --- the lock ------------------------------------------------------------------------------------

def test_second_holder_refuses_and_the_lock_goes_with_the_run(tmp_path):
    with hold(tmp_path) as guard:
        assert (guard.path / ".lowrank.lock").exists()
        with pytest.raises(ValueError, match="in use by another lowrank run"):
            RunDirectory(tmp_path)
    assert not (tmp_path / ".lowrank.lock").exists()
    with hold(tmp_path):   # free again
        pass


def test_concurrent_finetunes_one_refuses_in_one_line(runs, tmp_path):
    base, _, corpus = runs
    out = tmp_path / "same"
    first = _cli("finetune", "--base", base, "--out", out, "--corpus", corpus, "--save-every",
                 "50", *SMALL)
    try:
        assert _wait_for(out / ".lowrank.lock")
        for extra in (["--force"], []):
            second = _cli("finetune", "--base", base, "--out", out, "--corpus", corpus,
                          "--steps", "2", "--warmup", "0", "--batch-size", "2",
                          "--no-progress", *extra)
            _, err = second.communicate(timeout=120)
            lines = err.strip().splitlines()
            assert second.returncode == 2 and len(lines) == 1, err
            assert "in use by another lowrank run" in lines[0] or "already holds a run" in \
                lines[0], lines
            record("dirs", "refused", lines[0])
    finally:
        first.kill()
        first.wait()


SWAPS = ["symlink-to-base", "rename-away", "delete-and-empty-dir"]


@settings(max_examples=examples(3), deadline=None)
@given(swap=st.sampled_from(SWAPS), after=st.sampled_from([0.3, 1.0]))
def test_swapped_out_never_writes_into_the_base(runs, tmp_path_factory, swap, after):
    base, _, corpus = runs
    before = _tree_digest(base)
    root = tmp_path_factory.mktemp("swap")
    out = root / "run"
    proc = _cli("finetune", "--base", base, "--out", out, "--corpus", corpus, "--save-every",
                "1", *SMALL)
    try:
        assert _wait_for(out / "run.json")
        time.sleep(after)
        if swap == "symlink-to-base":
            os.rename(out, root / "moved")
            os.symlink(base, out)
        elif swap == "rename-away":
            os.rename(out, root / "moved")
        else:
            os.rename(out, root / "moved")
            out.mkdir()
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    lines = err.strip().splitlines()
    assert _tree_digest(base) == before, "the base changed"
    outcome = "refused" if proc.returncode == 2 and len(lines) == 1 and str(out) in lines[0] \
        else "wrong" if proc.returncode == 0 else "multiline"
    record("dirs", outcome, f"{swap} after {after}s: rc={proc.returncode} {err[-300:]}")


# --- the base an adapter was trained on ------------------------------------------------------------

def test_an_adapter_refuses_a_rebuilt_base(tmp_path):
    from lowrank.app.cli import main
    from lowrank.training.trainer import TrainConfig
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "lowrank" / "files" / "storage.py").read_text())
    data = wf.DataSpec([str(corpus)], max_bytes=40_000)
    spec = wf.ModelSpec(vocab_size=300, context=16, n_layer=1, n_head=2, d_model=16)
    train = TrainConfig(steps=2, batch_size=2, warmup=0)
    wf.pretrain(tmp_path / "base", spec, data, train, progress=False)
    wf.finetune(tmp_path / "ft", tmp_path / "base", "lora", ["q", "v"], {"r": 2}, data, train,
                progress=False)
    wf.load_finetuned(tmp_path / "base", tmp_path / "ft")   # the same base: fine
    wf.pretrain(tmp_path / "base", spec, data, TrainConfig(steps=2, batch_size=2, warmup=0,
                                                           seed=7), progress=False, force=True)
    with pytest.raises(ValueError, match="base_sha256.*--allow-other-base"):
        wf.load_finetuned(tmp_path / "base", tmp_path / "ft")
    wf.load_finetuned(tmp_path / "base", tmp_path / "ft", allow_other_base=True)
    code = main(["finetune", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "ft"),
                 "--resume", "--steps", "3", "--batch-size", "2", "--corpus", str(corpus),
                 "--no-progress"])
    assert code == 2
    record("dirs", "refused", "adapter on a rebuilt base")


# --- the run's own inputs ------------------------------------------------------------------------

def test_nan_stop_keeps_a_save_that_evaluates_finite(runs, tmp_path, capsys):
    from lowrank.app.cli import main
    base, _, corpus = runs
    out = tmp_path / "nan"
    code = main(["finetune", "--base", str(base), "--out", str(out), "--lr", "1e20",
                 "--save-every", "1", "--steps", "20", "--batch-size", "2", "--corpus",
                 str(corpus), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    if (out / "adapter_model.safetensors").exists():
        model, tok = wf.load_finetuned(base, out)
        tokens = wf.token_data(tok, wf.DataSpec([str(corpus)], 20_000), model.config.context)
        loss = wf.evaluate(model, tokens, 2, 2)
        assert np.isfinite(loss), loss
    record("dirs", "stopped", err[0])


def test_regex_targets_are_one_pattern(runs, tmp_path):
    base, _, corpus = runs
    spec = wf.DataSpec([str(corpus)], max_bytes=20_000)
    from lowrank.training.trainer import TrainConfig
    train = TrainConfig(steps=1, batch_size=2, warmup=0)
    with pytest.raises(ValueError, match="match no Linear module"):
        wf.finetune(tmp_path / "a", base, "lora", "qv", {"r": 2}, spec, train, progress=False)
    result = wf.finetune(tmp_path / "b", base, "lora", r".*\.(q|v)", {"r": 2}, spec, train,
                         progress=False)
    names = sorted(n for n, _ in wf.adapted_modules(result.model))
    assert names == ["blocks.0.attn.q", "blocks.0.attn.v"], names


def test_max_bytes_caps_corpus_files(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:   # 64 MB, never read whole
        fh.truncate(64 << 20)
    (tmp_path / "small.txt").write_text("é" * 10)
    text = lr_data.corpus(str(big), max_bytes=1000)
    assert len(text.encode("utf-8")) <= 1000
    text = lr_data.corpus([str(tmp_path / "small.txt"), str(big)], max_bytes=7)
    assert text == "ééé"   # a character cut in two is dropped, not refused
