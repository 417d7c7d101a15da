"""Build, save and load a fine-tuned classifier; fine-tune, evaluate and predict end to end.

A classifier directory (``lowrank finetune --task classify --out DIR``) holds:

* ``classify.json``: the task (labels in index order, pooling, max_length, variant, base,
  recipe, per-epoch validation metrics) — the label mapping evaluation and prediction use;
* ``classifier.safetensors``: the head (``classifier.weight (C, d)``, ``classifier.bias``),
  always — PEFT's ``modules_to_save``;
* with an adapter: ``adapter_model.safetensors`` + ``adapter_config.json`` (the encoder's
  adapters under the encoder's own module names); with full fine-tuning:
  ``encoder.safetensors`` (every encoder parameter); with the head alone: nothing more.

``DIR`` is the best epoch's checkpoint (highest validation accuracy), ``DIR/last`` the last's.
``classify.json`` is sealed (``storage.seal``) and records the SHA-256 of the other files, so
an edited label list or a swapped file is refused; its fields are checked (``CLASSIFY_FILE``)
and the label count is held against the head's header before anything is built.
Host-side I/O (docs/classification.md#files).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import backend
from ..formats import checkpoint
from ..formats.saved_adapters import inject_saved
from ..models.classifier import SequenceClassifier
from ..formats.model_dir import from_pretrained
from ..formats.base_identity import file_sha256
from ..formats.hf_config_check import read_header
from ..files.schema import check, int_in
from ..files.storage import (atomic_write, check_and_assign, read_safetensors, read_sealed_json,
                             safetensors_bytes, write_sealed_json)
from ..files.untrusted import sha256
from ..text.tokenizer import Tokenizer
from . import classify
from .data_files import read_examples
from .data_files import MAX_LABEL_CHARS, MAX_LABELS
from .text_data import TextData, encode_labels, label_names, sentiment_split

TASK_FILE, HEAD_FILE, ENCODER_FILE = "classify.json", "classifier.safetensors", \
    "encoder.safetensors"


def load_encoder(base, dtype: str = "float32"):
    """``(encoder, tokenizer)`` of a Hugging Face BERT directory or ``"minilm"``."""
    return from_pretrained(str(base), dtype=dtype), Tokenizer.from_pretrained(str(base))


def build(base, num_labels: int, config: classify.ClassifyConfig, dtype="float32"):
    encoder, tok = load_encoder(base, dtype)
    if hasattr(encoder, "set_dropout"):   # BERT's hidden and attention dropout
        encoder.set_dropout(config.model_dropout)
    clf = SequenceClassifier(encoder, num_labels, pooling=config.pooling, seed=config.seed,
                             dropout=config.model_dropout)
    return clf, tok


# --- files ---------------------------------------------------------------------------------

def save(clf, directory, info: dict) -> Path:
    """Write the classifier's trainable state and ``info`` (see the module docstring);
    ``classify.json`` is written last, so a directory with one is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digests = {HEAD_FILE: _write(directory / HEAD_FILE, clf.head_parameters())}
    if info["mode"] == "adapter":
        checkpoint.save_adapter(clf.encoder, directory)
        digests[ADAPTER_CONFIG] = file_sha256(directory / ADAPTER_CONFIG)
    elif info["mode"] == "full":
        digests[ENCODER_FILE] = _write(directory / ENCODER_FILE, clf.encoder.named_parameters())
    write_sealed_json(directory / TASK_FILE, {**info, FILES: digests})
    return directory


def _write(path: Path, named) -> str:
    data = safetensors_bytes({k: p.data for k, p in named})
    atomic_write(path, data)
    return sha256(data)


def _labels(v):
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_LABELS:
        return f"must be a list of 1 to {MAX_LABELS:,} label names"
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_LABEL_CHARS for n in v):
        return f"must hold strings of 1 to {MAX_LABEL_CHARS} characters"
    if len(set(v)) != len(v):
        return "holds a label twice (predictions would print the wrong name)"


FILES, ADAPTER_CONFIG = "sha256", checkpoint.ADAPTER_CONFIG_FILE
CLASSIFY_FILE = {"labels": _labels, "base": str, "recipe": dict, FILES: {str: str},
                 "mode": lambda v: None if v in ("adapter", "full", "head") else
                 f"must be 'adapter', 'full' or 'head', got {v!r}",
                 "task?": str, "variant?": str, "targets?": (list, str), "adapter?": (dict, None),
                 "epochs?": [dict], "best_epoch?": int_in(0, 1 << 31)}


def _check_file(directory: Path, info: dict, name: str) -> Path:
    """``directory / name``, its SHA-256 the one ``classify.json`` recorded."""
    path, want = directory / name, info[FILES].get(name)
    if want is None:
        raise ValueError(f"{directory / TASK_FILE}: field {FILES!r} records no SHA-256 for "
                         f"{name}; refusing to load an unverified file")
    if file_sha256(path) != want:
        raise ValueError(f"{path} differs from the file {directory / TASK_FILE} recorded "
                         "(changed, swapped or from another save)")
    return path


def read_info(directory) -> dict:
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: not a classifier directory (no {TASK_FILE}; write one "
                         "with `lowrank finetune --task classify`)")
    return check(read_sealed_json(path), CLASSIFY_FILE, str(path))


def load(directory, base=None, dtype: str = "float32"):
    """``(classifier in eval mode, tokenizer, info)`` from a directory ``save`` wrote, over
    ``base`` (default: the base it was trained from)."""
    info = read_info(directory)
    directory = Path(directory)
    head = _check_file(directory, info, HEAD_FILE)
    rows = read_header(head).get("classifier.weight", (None, (None,)))[1][0]
    if rows != len(info["labels"]):   # before a head of that many rows is built
        raise ValueError(f"{directory / TASK_FILE}: field 'labels' holds {len(info['labels'])} "
                         f"names, but {head} has a head of {rows} rows")
    try:
        config = classify.ClassifyConfig(**info["recipe"])
    except TypeError as exc:
        raise ValueError(f"{directory / TASK_FILE}: field 'recipe': {exc}") from None
    clf, tok = build(base or info["base"], len(info["labels"]), config, dtype)
    if info["mode"] == "adapter":
        _check_file(directory, info, ADAPTER_CONFIG)
        inject_saved(clf.encoder, directory, seed=config.seed)
        checkpoint.load_adapter(clf.encoder, directory)
    elif info["mode"] == "full":
        checkpoint.load_weights(clf.encoder, _check_file(directory, info, ENCODER_FILE))
    check_and_assign(dict(clf.head_parameters()), read_safetensors(head), head,
                     strict=True)
    return clf.eval(), tok, info


# --- workflows -------------------------------------------------------------------------------

def load_examples(train_path=None, eval_path=None, limit=None, **columns):
    """``(train, validation or None)`` examples: the files given, or the embedded split.
    ``limit`` caps the training examples; ``columns``: ``data_files.read_examples``'s
    format and column options (``format``, ``text_column``, ``label_column``,
    ``label_names``, ``header``), for both files."""
    val = None if eval_path is None else read_examples(eval_path, **columns)
    if train_path is None:
        train, shipped_val = sentiment_split()
        return train[:limit], (shipped_val if eval_path is None else val)
    return read_examples(train_path, limit=limit, **columns), val


def finetune(out, base, variant: str, config: classify.ClassifyConfig, train_examples,
             val_examples=None, options=None, targets=classify.TARGETS, dtype="float32",
             on_epoch=None, progress: bool = True, shards: int = 1) -> dict:
    """Fine-tune on ``train_examples``; after each epoch score ``val_examples`` and save
    ``out/last`` (and ``out`` when the accuracy is the best so far). Every input is checked
    (labels, tokenization) before anything is written."""
    names = label_names(train_examples)
    splits = {"train": train_examples}
    if val_examples is not None:
        encode_labels(val_examples, names)        # an unknown label fails before training
        splits["val"] = val_examples
    clf, tok = build(base, len(names), config, dtype)
    data = TextData.from_examples(tok, splits, names, config.max_length)
    mode = classify.mode_of(variant)
    cfg = classify.prepare(clf, variant, options, targets, seed=config.seed)
    info = {"task": "classify", "labels": names, "mode": mode, "variant": variant,
            "base": str(base), "recipe": config.to_dict(), "targets": list(targets),
            "adapter": None if cfg is None else cfg.to_dict(), "epochs": [],
            "trainable": clf.num_parameters(True), "total": clf.num_parameters()}
    best = {"accuracy": -1.0}

    def after_epoch(epoch, row, trainer):
        info["epochs"].append(row)
        save(clf, Path(out) / "last", info)
        accuracy = row.get("val_accuracy")
        if accuracy is None or accuracy > best["accuracy"]:   # no validation: the last
            best.update(accuracy=-1.0 if accuracy is None else accuracy, epoch=epoch)
            save(clf, out, {**info, "best_epoch": epoch})
        if on_epoch is not None:
            on_epoch(epoch, row)

    result = classify.train_classifier(clf, data, variant, config, after_epoch, progress,
                                       shards=shards)
    result.update(info=info, best=best, model=clf, data=data)
    return result


def evaluate_file(directory, path, base=None, batch_size: int = 32, **columns) -> dict:
    """Metrics of the saved classifier on a labelled file (checked before the model loads;
    ``columns``: ``data_files.read_examples``'s format and column options)."""
    info = read_info(directory)
    examples = read_examples(path, **columns)
    encode_labels(examples, info["labels"])
    clf, tok, info = load(directory, base)
    data = TextData.from_examples(tok, {"test": examples}, info["labels"],
                                  info["recipe"]["max_length"])
    return classify.evaluate(clf, data, "test", batch_size)


def predict(directory, texts, base=None) -> list[dict]:
    """``[{"label": name, "probabilities": {name: p}}]`` for each text."""
    clf, tok, info = load(directory, base)
    ids, mask = tok.encode_batch(list(texts), max_length=info["recipe"]["max_length"])
    xp = clf.xp
    probs = backend.to_numpy(clf.predict_proba(backend.asarray(np.asarray(ids), xp=xp),
                                               backend.asarray(np.asarray(mask), xp=xp)))
    names = info["labels"]
    return [{"label": names[int(row.argmax())],
             "probabilities": {n: float(p) for n, p in zip(names, row)}} for row in probs]

