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
Host-side I/O (docs/classification.md#files).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import backend
from ..formats import checkpoint
from ..adapters import config_from_dict, inject
from ..adapters.inject import SEED_STRIDE
from ..models.classifier import SequenceClassifier
from ..formats.hf_model import from_pretrained
from ..files.storage import (check_and_assign, read_json, read_safetensors, write_json,
                             write_safetensors)
from ..text.tokenizer import Tokenizer
from . import classify
from .text_data import TextData, encode_labels, label_names, read_tsv, sentiment_split

TASK_FILE, HEAD_FILE, ENCODER_FILE = "classify.json", "classifier.safetensors", \
    "encoder.safetensors"


def load_encoder(base, dtype: str = "float32"):
    """``(encoder, tokenizer)`` of a Hugging Face BERT directory or ``"minilm"``."""
    return from_pretrained(str(base), dtype=dtype), Tokenizer.from_pretrained(str(base))


def build(base, num_labels: int, config: classify.ClassifyConfig, dtype="float32"):
    encoder, tok = load_encoder(base, dtype)
    set_model_dropout(encoder, config.model_dropout)
    clf = SequenceClassifier(encoder, num_labels, pooling=config.pooling, seed=config.seed,
                             dropout=config.model_dropout)
    return clf, tok


def set_model_dropout(encoder, p: float) -> None:
    """BERT's hidden/attention dropout, when the encoder supports it (``dropout`` attribute
    of the encoder's config or a ``set_dropout`` method)."""
    if hasattr(encoder, "set_dropout"):
        encoder.set_dropout(p)


# --- files ---------------------------------------------------------------------------------

def save(clf, directory, info: dict) -> Path:
    """Write the classifier's trainable state and ``info`` (see the module docstring);
    ``classify.json`` is written last, so a directory with one is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / HEAD_FILE, {k: p.data for k, p in clf.head_parameters()})
    if info["mode"] == "adapter":
        checkpoint.save_adapter(clf.encoder, directory)
    elif info["mode"] == "full":
        write_safetensors(directory / ENCODER_FILE,
                          {k: p.data for k, p in clf.encoder.named_parameters()})
    write_json(directory / TASK_FILE, info)
    return directory


def read_info(directory) -> dict:
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: not a classifier directory (no {TASK_FILE}; write one "
                         "with `lowrank finetune --task classify`)")
    return read_json(path)


def load(directory, base=None, dtype: str = "float32"):
    """``(classifier in eval mode, tokenizer, info)`` from a directory ``save`` wrote, over
    ``base`` (default: the base it was trained from)."""
    info = read_info(directory)
    config = classify.ClassifyConfig(**info["recipe"])
    clf, tok = build(base or info["base"], len(info["labels"]), config, dtype)
    directory = Path(directory)
    if info["mode"] == "adapter":
        adapter = checkpoint.read_adapter_config(directory)
        if adapter["config"] is not None:   # the exact modules (a suffix like "dense" would
            inject(clf.encoder, config_from_dict(adapter["config"]),   # also take the pooler)
                   list(adapter["modules"]), seed=config.seed)
        else:   # per-module configs (e.g. ranks a variant pruned)
            for i, (name, meta) in enumerate(adapter["modules"].items()):
                inject(clf.encoder, config_from_dict(meta["config"]), [name],
                       seed=config.seed + SEED_STRIDE * i)
        checkpoint.load_adapter(clf.encoder, directory)
    elif info["mode"] == "full":
        checkpoint.load_weights(clf.encoder, directory / ENCODER_FILE)
    head = directory / HEAD_FILE
    check_and_assign(dict(clf.head_parameters()), read_safetensors(head), head,
                     strict=True)
    return clf.eval(), tok, info


# --- workflows -------------------------------------------------------------------------------

def load_examples(train_path=None, eval_path=None):
    """``(train, validation or None)`` examples: the files given, or the embedded split."""
    if train_path is None:
        train, val = sentiment_split()
        return train, (val if eval_path is None else read_tsv(eval_path))
    return read_tsv(train_path), None if eval_path is None else read_tsv(eval_path)


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


def evaluate_file(directory, path, base=None, batch_size: int = 32) -> dict:
    """Metrics of the saved classifier on a labelled file (checked before the model loads)."""
    info = read_info(directory)
    examples = read_tsv(path)
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


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=float)
