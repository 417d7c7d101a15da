"""What a save may and may not do: stop before a non-finite update is written, never write
into another run or delete a file it did not write, respect the umask, clean what a killed save
left, leave nothing behind after a failed first run; and kill-during-save (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowrank.formats import checkpoint
from lowrank.app import cli
from lowrank.files import storage
from lowrank.app import workflows as wf
from lowrank.training.trainer import NonFiniteLossError, TrainConfig

from tests.helpers.hardening import ROOT, make_runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("save-runs"))


def _all_finite(model) -> bool:
    return all(np.isfinite(p.data).all() for p in model.parameters())


def test_runaway_learning_rate_stops_before_saving_and_leaves_a_finite_save(runs, tmp_path,
                                                                              capsys):
    """``finetune --variant full --lr 1e38 --save-every 1``: the update that overflows is
    never written; the last save loads and is finite, its optimizer state too."""
    base, _, corpus = runs
    out = tmp_path / "ft"
    code = cli.main(["finetune", "--base", str(base), "--out", str(out), "--variant", "full",
                     "--lr", "1e38", "--save-every", "1", "--steps", "20",
                     "--batch-size", "2", "--corpus", str(corpus), "--max-bytes", "20000",
                     "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "NaN or Inf" in err[0] or "loss is nan" in err[0] or "loss of nan" in err[0], err[0]
    if "no checkpoint was written" in err[0]:   # the first update already scored NaN
        assert not (out / "model.safetensors").exists()
        return
    model, _, _ = wf.load_base(out)
    assert _all_finite(model)
    state = checkpoint.load_training_state(out)
    for moments in state["optimizer"]["state"].values():
        assert np.isfinite(moments["exp_avg"]).all() and np.isfinite(moments["exp_avg_sq"]).all()


def test_update_check_names_the_tensor(runs):
    from lowrank.training.update_check import NonFiniteUpdateError, check_update
    model, _, _ = wf.load_base(runs[0])

    class Stub:
        step = 3
        optimizer = None
    Stub.model = model
    check_update(Stub)
    dict(model.named_parameters())["ln_f.weight"].data[0] = np.nan
    with pytest.raises(NonFiniteUpdateError, match=r"1 of \d+ entries of parameter 'ln_f.weight'"):
        check_update(Stub, last_saved=2)
    assert issubclass(NonFiniteUpdateError, NonFiniteLossError)


def test_a_save_keeps_a_users_file_that_looks_like_a_version(runs, tmp_path):
    model, _, _ = wf.load_base(runs[0])
    users = tmp_path / f"model.{'ab' * 16}.safetensors"
    tmp_path.mkdir(exist_ok=True)
    users.write_bytes(b"my own file")
    ours = tmp_path / f"model.{'cd' * 16}.safetensors"   # a version a killed save left
    ours.write_bytes(storage.safetensors_bytes({"x": np.zeros(2)},
                                               {storage.SAVE_ID_KEY: "cd" * 16}))
    stale = tmp_path / ".model.safetensors.abc123.lowrank-tmp"
    stale.write_bytes(b"half")
    checkpoint.save_model(model, tmp_path)
    assert users.read_bytes() == b"my own file"
    assert not ours.exists() and not stale.exists()


def test_files_follow_the_umask(runs, tmp_path):
    model, _, _ = wf.load_base(runs[0])
    old = os.umask(0o027)
    try:
        checkpoint.save_model(model, tmp_path / "m")
    finally:
        os.umask(old)
    for path in (tmp_path / "m").iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_writing_into_another_run_needs_resume_or_force(runs, tmp_path):
    base, ft, corpus = runs
    data = wf.DataSpec([str(corpus)], max_bytes=20000)
    train = TrainConfig(steps=1, batch_size=2, warmup=0)
    for out in (base, ft):   # the base itself, and another fine-tune
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        with pytest.raises(ValueError, match="--out|base model's own"):
            wf.finetune(out, base, "full", data_spec=data, train=train, progress=False)
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    spec = wf.ModelSpec(vocab_size=300, context=16, n_layer=1, n_head=2, d_model=16)
    with pytest.raises(ValueError, match="already holds a run"):
        wf.pretrain(base, spec, data, train, progress=False)
    copy = tmp_path / "copy"
    wf.pretrain(copy, spec, data, train, progress=False)
    wf.pretrain(copy, spec, data, train, progress=False, force=True)


def test_a_failed_first_pretrain_leaves_no_tokenizer(runs, tmp_path):
    _, _, corpus = runs
    spec = wf.ModelSpec(vocab_size=300, context=16, n_layer=1, n_head=2, d_model=16)
    train = TrainConfig(steps=3, batch_size=2, lr=1e38, min_lr=0.0, warmup=0)
    with pytest.raises(NonFiniteLossError):
        wf.pretrain(tmp_path / "run", spec, wf.DataSpec([str(corpus)], max_bytes=20000), train,
                    progress=False)
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_json_errors_name_the_file(runs, tmp_path):
    import shutil
    shutil.copytree(runs[1], tmp_path / "ft")
    (tmp_path / "ft" / "run.json").write_text("[]")
    with pytest.raises(ValueError, match=r"run\.json holds a list"):
        wf.read_run(tmp_path / "ft")
    (tmp_path / "ft" / "run.json").write_text("{")
    with pytest.raises(ValueError, match=r"cannot parse JSON file .*run\.json"):
        wf.read_run(tmp_path / "ft")


def test_a_tokenizer_that_makes_the_library_panic_is_one_line(runs, tmp_path):
    """A tokenizer.json with a truncation stride >= max_length makes `tokenizers` panic (pyo3's
    PanicException, a BaseException, plus a Rust backtrace on fd 2) when it encodes."""
    import shutil
    base = tmp_path / "base"
    shutil.copytree(runs[0], base)
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["truncation"] = {"max_length": 1, "stride": 5, "strategy": "LongestFirst",
                          "direction": "Right"}
    (base / "tokenizer.json").write_text(json.dumps(spec))
    os.unlink(base / "run.json")   # so that no recorded SHA-256 catches it first
    proc = subprocess.run([sys.executable, "-m", "lowrank.app.cli", "generate", "--model",
                           str(base), "--max-new-tokens", "2"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "tokenizer.json" in proc.stderr


@pytest.mark.skipif(not os.environ.get("LOWRANK_SLOW"), reason="slow: set LOWRANK_SLOW=1")
def test_kill_during_save_never_leaves_a_corrupt_checkpoint(tmp_path):
    """benchmarks/kill_during_save.py with 50 kills: every directory loads a whole save."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kill_during_save.py"),
                           "--trials", "50", "--dir", str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "corrupt 0 of 50" in proc.stdout, proc.stdout


def test_a_save_without_integrity_record_is_refused_with_a_clear_message(runs, tmp_path):
    """A checkpoint written before integrity records (or with its record deleted)."""
    import shutil
    shutil.copytree(runs[1], tmp_path / "ft")
    path = tmp_path / "ft" / "adapter_config.json"
    info = json.loads(path.read_text())
    del info["integrity"]
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"adapter_config\.json has no integrity record .*"
                                         r"save it again with this version"):
        wf.load_finetuned(runs[0], tmp_path / "ft")


def test_adalora_report_says_when_the_budget_was_not_reached(runs, tmp_path, capsys):
    base, _, corpus = runs
    assert cli.main(["finetune", "--base", str(base), "--out", str(tmp_path / "ft"),
                     "--variant", "adalora", "--init-r", "4", "--target-r", "2",
                     "--total-step", "50", "--tfinal", "5", "--steps", "1", "--batch-size", "2",
                     "--corpus", str(corpus), "--max-bytes", "20000", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "budget not reached" in out, out


@pytest.mark.parametrize("edit", ["eps", "rng", "step"])
def test_json_training_state_is_covered_by_the_integrity_record(runs, tmp_path, edit):
    """An edit to the JSON state (not only to the tensors) is refused, naming the file."""
    import shutil
    shutil.copytree(runs[1], tmp_path / "ft")
    path = tmp_path / "ft" / "adapter_config.json"
    info = json.loads(path.read_text())
    state = info["train_state"]
    if edit == "eps":
        state["optimizer"]["eps"] *= 10
    elif edit == "rng":
        state["rng"]["state"]["state"] += 1
    else:
        state["step"] += 1
    path.write_text(json.dumps(info, indent=2))
    with pytest.raises(ValueError, match=r"adapter_config\.json does not match its integrity"):
        checkpoint.load_training_state(tmp_path / "ft")
