"""What the CLI runs: pretrain, finetune (full or any adapter variant), evaluate, generate.

Each workflow writes into one directory:

* a base model (``pretrain``): ``model.safetensors``, ``config.json`` (model config, training
  state), ``optimizer.safetensors``, ``tokenizer.json``, ``run.json`` (data settings, history);
* an adapter (``finetune``): ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT keys),
  training state in ``config.json``/``optimizer.safetensors``, ``run.json``. Full fine-tuning
  writes a whole model instead.

Checkpoints are written atomically, so a crash (or a non-finite loss) leaves the last good one.

Data parallel (``comm`` of size > 1, e.g. under ``mpiexec``): every rank builds the same model
and trains its share of each batch; only rank 0 writes files (tokenizer, checkpoints, run
files, reports) while the others wait at a barrier, so no rank races ahead of a write.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import backend, checkpoint
from .adapters import adapted_modules, config as adapter_config, config_from_dict, inject
from .adapters.inject import SEED_STRIDE
from .data import TokenData, corpus
from .models import GPT, GPTConfig
from .parallel import SingleProcess
from .pretrained import from_pretrained, is_foreign
from .tokenizer import Tokenizer, train_tokenizer
from .train import Trainer, TrainConfig

RUN_FILE = "run.json"
DEFAULT_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


@dataclass
class DataSpec:
    corpus: str | list = "docs"
    max_bytes: int = 1_500_000
    val_fraction: float = 0.1


@dataclass
class ModelSpec:
    vocab_size: int = 1024
    context: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    tie_embeddings: bool = True


@dataclass
class RunResult:
    out: Path
    history: list = field(default_factory=list)
    val_loss: float = float("nan")
    trainable: int = 0
    total: int = 0
    tokens_per_s: float = float("nan")


def _write_run(out: Path, info: dict) -> None:
    checkpoint.atomic_write(out / RUN_FILE, json.dumps(info, indent=1, default=float))


def read_run(out) -> dict:
    path = Path(out) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def token_data(tok: Tokenizer, spec: DataSpec, context: int) -> TokenData:
    text = corpus(spec.corpus, max_bytes=spec.max_bytes)
    return TokenData(tok.encode(text), context, val_fraction=spec.val_fraction)


def _checkpointer(out: Path, trainer: Trainer, save, every: int):
    def on_step(tr, record):
        if every and (tr.step % every == 0 or tr.step == tr.config.steps):
            save(tr)
    return on_step


def _root_only(comm):
    """Decorate a writer: it runs on rank 0 only and every rank waits until it is done."""
    def wrap(write):
        def run(*args):
            if comm.is_root:
                write(*args)
            comm.barrier()
        return run
    return wrap


def pretrain(out, model_spec: ModelSpec, data_spec: DataSpec, train: TrainConfig, *,
             dtype="float32", backend_name=None, resume=False, save_every=0,
             progress=True, comm=None) -> RunResult:
    comm = SingleProcess() if comm is None else comm
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if backend_name:
        backend.set_backend(backend_name)
    tok_path = out / "tokenizer.json"
    if resume and tok_path.exists():
        tok = Tokenizer.load(tok_path)
    elif comm.size == 1:
        text = corpus(data_spec.corpus, max_bytes=data_spec.max_bytes)
        tok = train_tokenizer(text, model_spec.vocab_size)
        tok.save(tok_path)
    else:   # rank 0 trains it; every rank tokenizes with the saved file, so all agree
        _root_only(comm)(lambda: train_tokenizer(
            corpus(data_spec.corpus, max_bytes=data_spec.max_bytes),
            model_spec.vocab_size).save(tok_path))()
        tok = Tokenizer.load(tok_path)
    data = token_data(tok, data_spec, model_spec.context)
    cfg = GPTConfig(vocab_size=tok.vocab_size, context=model_spec.context,
                    n_layer=model_spec.n_layer, n_head=model_spec.n_head,
                    d_model=model_spec.d_model, tie_embeddings=model_spec.tie_embeddings)
    model = GPT(cfg, seed=train.seed, dtype=dtype)
    trainer = Trainer(model, data, train, comm=comm)
    history = []
    if resume:
        history = _resume(out, trainer, lambda: checkpoint.load_weights(model, out))

    @_root_only(comm)
    def save(tr):
        checkpoint.save_model(model, out, train_state=_train_state(tr))
        _write_run(out, {"kind": "base", "data": data_spec.__dict__, "train": train.to_dict(),
                         "history": history})

    history += trainer.fit(_checkpointer(out, trainer, save, save_every), progress, "pretrain")
    save(trainer)
    return RunResult(out, history, trainer.evaluate(), model.num_parameters(True),
                     model.num_parameters(), _median_speed(history))


def load_base(base, dtype=None, backend_name=None):
    """``(model, tokenizer, run info)`` of a pretrained directory (lowrank's or, for a GPT-2,
    Hugging Face's)."""
    base = Path(base)
    if is_foreign(base):
        model = from_pretrained(base, dtype or backend.DEFAULT_DTYPE, backend_name)
        if not isinstance(model, GPT):
            raise ValueError(f"{base} holds a {type(model).__name__}, which has no language-model "
                             "head: this command needs a GPT (e.g. a gpt2 directory)")
        return model, Tokenizer.from_pretrained(base), {}
    model = checkpoint.load_model(base, backend_name)
    if dtype is not None and backend.check_dtype(dtype) != model.dtype.name:
        for p in model.parameters():
            p.data = p.data.astype(dtype)
    return model, Tokenizer.load(base / "tokenizer.json"), read_run(base)


def prepare_finetune(model, variant: str, targets, options: dict, seed: int = 0):
    """Full fine-tuning (``variant="full"``) or an injected adapter of a registered variant."""
    if variant == "full":
        return None
    cfg = adapter_config(variant, **options)
    inject(model, cfg, list(targets), seed=seed)
    return cfg


def finetune(out, base, variant: str, targets=DEFAULT_TARGETS, options=None,
             data_spec: DataSpec | None = None, train: TrainConfig | None = None, *,
             dtype=None, backend_name=None, resume=False, save_every=0, progress=True,
             eval_data: dict | None = None, comm=None) -> RunResult:
    """Fine-tune ``base`` on ``data_spec``; ``eval_data`` maps names to extra TokenData to score."""
    comm = SingleProcess() if comm is None else comm
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_spec = data_spec or DataSpec(corpus="code")
    train = train or TrainConfig()
    model, tok, base_run = load_base(base, dtype, backend_name)
    data = token_data(tok, data_spec, model.config.context)
    cfg = prepare_finetune(model, variant, targets, options or {}, seed=train.seed)
    trainer = Trainer(model, data, train, comm=comm)
    history = []
    if resume:
        history = _resume(out, trainer, lambda: _load_finetuned_weights(model, out, cfg))

    # a fine-tuned directory is usable on its own
    _root_only(comm)(lambda: tok.save(out / "tokenizer.json"))()

    @_root_only(comm)
    def save(tr):
        if cfg is None:
            checkpoint.save_model(model, out, train_state=_train_state(tr))
        else:
            checkpoint.save_adapter(model, out, train_state=_train_state(tr))
        _write_run(out, {"kind": "full" if cfg is None else "adapter", "base": str(base),
                         "variant": variant, "targets": list(targets),
                         "config": None if cfg is None else cfg.to_dict(),
                         "data": data_spec.__dict__, "train": train.to_dict(),
                         "history": history})

    start = time.perf_counter()
    history += trainer.fit(_checkpointer(out, trainer, save, save_every), progress, variant)
    elapsed = time.perf_counter() - start
    save(trainer)
    result = RunResult(out, history, trainer.evaluate(), model.num_parameters(True),
                       model.num_parameters(), _median_speed(history))
    result.seconds = elapsed
    result.model, result.trainer = model, trainer
    result.extra_eval = {name: trainer.evaluate(d) for name, d in (eval_data or {}).items()}
    result.report = variant_report(model, out) if comm.is_root else []
    comm.barrier()
    return result


def variant_report(model, out) -> list[str]:
    """Lines (and files in ``out``) a variant reports after training, e.g. AdaLoRA's ranks:
    an adapter class may define ``report(model, out) -> list[str]`` (a classmethod)."""
    lines, seen = [], set()
    for _, module in adapted_modules(model):
        if hasattr(type(module), "report") and type(module) not in seen:
            seen.add(type(module))
            lines += type(module).report(model, Path(out))
    return lines


def load_finetuned(base, adapter_dir, dtype=None, backend_name=None):
    """Base model with a saved fine-tune applied: an adapter directory or a full model."""
    run = read_run(adapter_dir)
    if run.get("kind") == "full":
        model, tok, _ = load_base(adapter_dir, dtype, backend_name)
        return model, tok
    model, tok, _ = load_base(base, dtype, backend_name)
    info = checkpoint.read_adapter_config(adapter_dir)
    seed = run.get("train", {}).get("seed", 0)
    if info["config"] is not None:
        inject(model, config_from_dict(info["config"]), info["targets"], seed=seed)
    else:   # modules differ (e.g. SoRA pruned to a LoRA of each module's kept rank)
        for i, (name, meta) in enumerate(info["modules"].items()):
            inject(model, config_from_dict(meta["config"]), [name], seed=seed + SEED_STRIDE * i)
    checkpoint.load_adapter(model, adapter_dir)
    return model, tok


def _load_finetuned_weights(model, out, cfg):
    if cfg is None:
        checkpoint.load_weights(model, out)
    else:
        checkpoint.load_adapter(model, out)


def _train_state(tr: Trainer) -> dict:
    state = tr.state_dict()
    return {"step": state["step"], "optimizer": state["optimizer"], "rng": state["rng"],
            "extra": _extra_state(tr)}


def _extra_state(tr: Trainer) -> dict:
    state = tr.state_dict()
    return {"tokens_seen": tr.tokens_seen, "dropout_rngs": state["dropout_rngs"],
            "hooks": state["hooks"]}


def _resume(out: Path, trainer: Trainer, load_weights) -> list:
    state = checkpoint.load_training_state(out)
    if state is None:
        raise ValueError(f"--resume: {out} holds no training state to resume from")
    load_weights()
    trainer.load_state_dict({"step": state["step"], "rng": state["rng"],
                             "optimizer": state["optimizer"],
                             "tokens_seen": state["extra"].get("tokens_seen", 0),
                             "dropout_rngs": state["extra"].get("dropout_rngs", {}),
                             "hooks": state["extra"].get("hooks", [])})
    return read_run(out).get("history", [])


def _median_speed(history) -> float:
    speeds = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    return float(np.median(speeds)) if speeds else float("nan")


def evaluate(model, data: TokenData, batch_size=16, batches=16) -> float:
    model.eval()
    xp = model.xp
    losses = [model.loss(backend.asarray(x, xp=xp), backend.asarray(y, xp=xp))[0]
              for x, y in data.eval_batches("val", batch_size, batches)]
    model.train()
    return float(np.mean(losses))


def generate(model, tok: Tokenizer, prompt: str, max_new_tokens=100, temperature=0.8,
             top_k=40, seed=0) -> str:
    """Sample a continuation (the context window slides over the last ``context`` tokens)."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in tok.encode(prompt)] or [0]
    model.eval()
    xp, T = model.xp, model.config.context
    for _ in range(max_new_tokens):
        window = backend.asarray(np.asarray([ids[-T:]], dtype=np.int64), xp=xp)
        logits, _ = model.forward(window)
        last = backend.to_numpy(logits[0, -1]).astype(np.float64) / max(temperature, 1e-6)
        if top_k and top_k < last.size:
            cutoff = np.partition(last, -top_k)[-top_k]
            last[last < cutoff] = -np.inf
        probs = np.exp(last - last.max())
        ids.append(int(rng.choice(last.size, p=probs / probs.sum())))
    return tok.decode(ids)


__all__ = ["DataSpec", "ModelSpec", "RunResult", "pretrain", "finetune", "load_base",
           "load_finetuned", "evaluate", "generate", "prepare_finetune", "adapted_modules"]
