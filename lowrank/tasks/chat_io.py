"""Fine-tune a chat model end to end, save it, load it, score it (docs/chat.md#files).

A chat directory (``lowrank finetune --task chat --out DIR``) holds the adapter
(``adapter_model.safetensors`` + ``adapter_config.json``, PEFT keys; with ``save_every`` also
the training state, for ``resume``) and ``chat.json`` (base, variant, targets, recipe, what
``max_length`` cut, the history), written last. Resume restores the adapter, AdamW, the
sampling RNG, the dropout streams, the hooks and the data order: the run continues bit for
bit as if never killed. Host-side I/O.
"""
from __future__ import annotations

from pathlib import Path

from ..files.storage import cap_for, read_json, write_json
from ..formats import checkpoint
from ..formats.model_dir import from_pretrained
from ..formats.saved_adapters import inject_saved
from ..quant import quantize_base
from ..text.chat_template import ChatTemplate
from ..text.tokenizer import Tokenizer
from ..training.update_check import check_update
from . import chat
from .chat_data import ChatData, read_jsonl

TASK_FILE = "chat.json"


def load_base(base, dtype: str = "float32"):
    """``(model, tokenizer, chat template)`` of a GGUF file, ``"smollm2"`` or a Llama-family
    Hugging Face directory."""
    model = from_pretrained(str(base), dtype=dtype)
    if not hasattr(model, "head_forward"):
        raise ValueError(f"{base}: a {type(model).__name__} is no chat model (the chat task "
                         "needs a Llama-family causal language model, e.g. smollm2)")
    return model, Tokenizer.from_pretrained(str(base)), ChatTemplate.from_pretrained(str(base))


def load_data(tok, template, train_path, eval_path=None, max_length: int = 512) -> ChatData:
    """Every file read and checked (one line naming file:line on the first bad one) before
    anything is written."""
    splits = {"train": read_jsonl(train_path)}
    if eval_path is not None:
        splits["val"] = read_jsonl(eval_path)
    return ChatData.from_conversations(template, tok, splits, max_length), splits


def read_info(directory) -> dict:
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: not a chat directory (no {TASK_FILE}; write one with "
                         "`lowrank finetune --task chat`)")
    return read_json(path)


def _save(model, out: Path, info: dict, trainer=None, data=None) -> None:
    state = None
    if trainer is not None:
        state = {**trainer.state_dict(), "extra": {"data": data.state_dict()}}
    checkpoint.save_adapter(model, out, train_state=state)
    write_json(out / TASK_FILE, info)


def _resume(model, out: Path, trainer, data) -> list:
    read_info(out)   # a chat directory, else one line saying so
    params = trainer.optimizer.params
    shapes = {f"{m}.{n}": p.shape for n, p in params.items() for m in ("exp_avg", "exp_avg_sq")}
    state = checkpoint.load_training_state(out, shapes, cap_for(model.parameters(), copies=4))
    if state is None:
        raise ValueError(f"--resume: {out} holds no training state (save with --save-every)")
    checkpoint.load_adapter(model, out)
    extra = state.pop("extra", {}) or {}
    trainer.load_state_dict(state)
    data.load_state_dict(extra.get("data", {}))
    return read_info(out).get("history", [])


def finetune(out, base, variant: str, config: chat.ChatConfig, train_path, eval_path=None,
             options=None, targets=chat.TARGETS, dtype: str = "float32", resume: bool = False,
             save_every: int = 0, progress: bool = True, on_epoch=None, accuracy: bool = False,
             say=print, quantize: str | None = None) -> dict:
    """Fine-tune ``base`` on the conversations of ``train_path``; after each epoch score
    ``eval_path`` (loss, perplexity; exact match with ``accuracy``) and save ``out``."""
    model, tok, template = load_base(base, dtype)
    data, conversations = load_data(tok, template, train_path, eval_path, min(
        config.max_length, model.config.max_position_embeddings))
    for split, report in data.reports.items():
        say(report.line(split))
    out = Path(out)
    cfg = chat.prepare(model, variant, options, targets, seed=config.seed, quantize=quantize)
    trainer = chat.make_trainer(model, data, config)
    info = {"task": "chat", "base": str(base), "variant": variant,
            "targets": targets if isinstance(targets, str) else list(targets),
            "adapter": cfg.to_dict(), "recipe": config.to_dict(), "quantize": quantize,
            "cut": {s: vars(r) | {"details": r.details[:100]} for s, r in data.reports.items()},
            "trainable": model.num_parameters(True), "total": model.num_parameters(),
            "history": [], "epochs": []}
    if resume:
        info["history"] = _resume(model, out, trainer, data)
    saved = [trainer.step or None]

    def on_step(tr, record):
        check_update(tr, saved[0])   # a blown-up update is never saved
        info["history"].append({k: v for k, v in record.items() if isinstance(v, (int, float))})
        if save_every and tr.step % save_every == 0 and tr.step != tr.config.steps:
            _save(model, out, info, tr, data)
            saved[0] = tr.step

    def after_epoch(epoch, row, tr):
        if "val" in data.splits:
            row.update({f"val_{k}": v for k, v in
                        chat.evaluate_loss(model, data, "val", config.batch_size).items()})
            if accuracy:
                row.update({f"val_{k}": v for k, v in chat.evaluate_accuracy(
                    model, tok, template, conversations["val"], config.max_new_tokens).items()})
        info["epochs"].append(row)
        _save(model, out, info, tr, data)
        saved[0] = tr.step
        if on_epoch is not None:
            on_epoch(epoch, row)

    result = chat.train_chat(model, data, config, trainer, on_step, after_epoch, progress)
    result.update(info=info, model=model, tokenizer=tok, template=template, data=data, out=out)
    return result


def load(directory, base=None, dtype: str = "float32"):
    """``(model in eval mode, tokenizer, template, info)`` of a chat directory over ``base``
    (default: the base it was trained from)."""
    info = read_info(directory)
    model, tok, template = load_base(base or info["base"], dtype)
    inject_saved(model, directory, seed=info.get("recipe", {}).get("seed", 0))
    if info.get("quantize"):   # the adapter was trained over this quantized base
        quantize_base(model, info["quantize"])
    checkpoint.load_adapter(model, directory)
    return model.eval(), tok, template, info


def evaluate_file(path, directory=None, base=None, accuracy: bool = False,
                  batch_size: int = 8, max_length: int | None = None,
                  max_new_tokens: int | None = None, dtype: str = "float32") -> dict:
    """Loss, perplexity (and exact-match accuracy) on a JSONL file, of a chat directory
    (its adapter over its base) or of ``base`` alone (zero-shot)."""
    conversations = read_jsonl(path)   # checked before the model loads
    if directory is not None:
        model, tok, template, info = load(directory, base, dtype)
        recipe = info.get("recipe", {})
    else:
        model, tok, template = load_base(base, dtype)
        model.eval()
        recipe = {}
    max_length = min(max_length or recipe.get("max_length", 512),
                     model.config.max_position_embeddings)
    max_new_tokens = max_new_tokens or recipe.get("max_new_tokens", 32)
    data = ChatData.from_conversations(template, tok, {"test": conversations}, max_length)
    out = chat.evaluate_loss(model, data, "test", batch_size)
    out["cut"] = data.reports["test"].line("test")
    if accuracy:
        out.update(chat.evaluate_accuracy(model, tok, template, conversations, max_new_tokens))
    return out


__all__ = ["TASK_FILE", "evaluate_file", "finetune", "load", "load_base", "load_data",
           "read_info"]
