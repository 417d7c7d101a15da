"""What the CLI runs: pretrain, finetune (full or any adapter variant), evaluate, generate.

Each workflow writes into one directory:

* a base model (``pretrain``): ``model.safetensors``, ``config.json`` (model config, training
  state), ``optimizer.safetensors``, ``tokenizer.json``, ``run.json`` (data settings, history);
* an adapter (``finetune``): ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT keys),
  training state in ``config.json``/``optimizer.safetensors``, ``run.json``. Full fine-tuning
  writes a whole model instead.

Checkpoints are written atomically and every update is checked finite before it can be saved,
so a crash, a non-finite loss or a blown-up update leaves the last good one.

Data parallel (``comm`` of size > 1, e.g. under ``mpiexec``): every rank builds the same model
and trains its share of each batch; only rank 0 writes files (tokenizer, checkpoints, run
files, reports) while the others wait at a barrier, so no rank races ahead of a write.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import backend
from ..formats import checkpoint, peft_dir as peft_files
from ..adapters import adapted_modules, config as adapter_config, inject
from ..formats.base_identity import FIELD as BASE_SHA, base_weights_sha256, check_same_base
from ..nn.validate import near_fields
from ..text.corpus import TokenData, corpus
from ..models import GPT, Bert, GPTConfig
from ..models.generate import generate as generate_ids
from ..parallel import SingleProcess
from ..formats.model_dir import GGUF, HUGGING_FACE, ModelSource, inspect, open_model
from .run_dir import TOKENIZER_FILE, load_tokenizer, prepare_out, read_run, say, write_run
from ..files.storage import cap_for
from ..quant import quantize_base
from .run_lock import check_unchanged, run_locked
from ..text.tokenizer import Tokenizer, train_tokenizer
from ..training.trainer import Trainer, TrainConfig
from ..training.update_check import check_savable, check_update
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

    def __post_init__(self):   # caps that keep a typo from allocating the machine away
        for name, high in (("vocab_size", 1 << 20), ("context", 1 << 14), ("n_layer", 256),
                           ("n_head", 1024), ("d_model", 1 << 14)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}")


@dataclass
class RunResult:
    out: Path
    history: list = field(default_factory=list)
    val_loss: float = float("nan")
    trainable: int = 0
    total: int = 0
    tokens_per_s: float = float("nan")


_write_run = write_run   # the name demo and multi use


def token_data(tok: Tokenizer, spec: DataSpec, context: int) -> TokenData:
    text = corpus(spec.corpus, max_bytes=spec.max_bytes)
    try:
        ids = tok.encode(text)
    except (KeyboardInterrupt, SystemExit, ValueError):
        raise   # a ValueError already names the tokenizer's file
    except BaseException as exc:   # pyo3's PanicException is not an Exception
        raise ValueError(f"the tokenizer failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return TokenData(ids, context, val_fraction=spec.val_fraction)


def _checkpointer(out: Path, trainer: Trainer, save, every: int, progress: bool = True):
    """``on_step``: check the update (``update_check``), print a validation loss as it comes,
    save every ``every`` steps. ``on_step.saved`` is the step of the last save."""
    def on_step(tr, record):
        check_update(tr, on_step.saved)   # before anything of this step is written
        if "val_loss" in record:
            say(f"step {tr.step}: validation loss {record['val_loss']:.4f}", progress)
        if every and (tr.step % every == 0 or tr.step == tr.config.steps):
            check_savable(tr, on_step.saved, record)   # a kept save scores a finite loss
            on_step.save(tr)
            on_step.saved = tr.step
    on_step.saved = trainer.step or None
    on_step.save = lambda tr: (check_unchanged(out), save(tr))   # never into a swapped --out
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
             progress=True, comm=None, force=False) -> RunResult:
    """Train a GPT and its tokenizer from scratch into ``out`` (``force``: replace a run
    already there; ``resume``: continue it)."""
    comm = SingleProcess() if comm is None else comm
    out = prepare_out(out, resume=resume, force=force) if comm.is_root else Path(out)
    comm.barrier()
    if backend_name:
        backend.set_backend(backend_name)
    return run_locked(out, comm.is_root, lambda where: _pretrain(   # one writer, saves go
        where, model_spec, data_spec, train, dtype, resume, save_every,   # where it was opened
        progress, comm, where / TOKENIZER_FILE))


def _pretrain(out, model_spec, data_spec, train, dtype, resume, save_every, progress, comm,
              tok_path) -> RunResult:
    if resume and tok_path.exists():
        tok = load_tokenizer(out, read_run(out))
    elif comm.size == 1:
        text = corpus(data_spec.corpus, max_bytes=data_spec.max_bytes)
        tok = train_tokenizer(text, model_spec.vocab_size)
        tok.save(tok_path)
    else:   # rank 0 trains it; every rank tokenizes with the saved file, so all agree
        _root_only(comm)(lambda: train_tokenizer(
            corpus(data_spec.corpus, max_bytes=data_spec.max_bytes),
            model_spec.vocab_size).save(tok_path))()
        tok = load_tokenizer(out)
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
        checkpoint.save_model(model, out, train_state=tr.state_dict())
        _write_run(out, {"kind": "base", "data": data_spec.__dict__, "train": train.to_dict(),
                         "history": history})

    on_step = _checkpointer(out, trainer, save, save_every, progress)
    history += trainer.fit(on_step, progress, "pretrain")
    check_savable(trainer, on_step.saved)
    on_step.save(trainer)
    return RunResult(out, history, trainer.evaluate()["loss"], model.num_parameters(True),
                     model.num_parameters(), _median_speed(history))


def base_source(base) -> ModelSource:
    """``model_dir.inspect`` of a base (its config read once); a path that does not exist
    -> FileNotFoundError (a name such as ``minilm`` is resolved by ``inspect``)."""
    if isinstance(base, ModelSource):
        return base
    if not isinstance(base, str) and not Path(base).exists():
        raise FileNotFoundError(f"model directory not found: {base}")
    return inspect(base)


def load_base(base, dtype=None, backend_name=None):
    """``(model, tokenizer, run info)`` of a language model: a lowrank directory, a Hugging Face
    one, a name, or the ``inspect`` result of one (``model_dir.open_model``, the one way in)."""
    source = base_source(base)
    model = open_model(source, dtype, backend_name)
    if isinstance(model, Bert):
        raise ValueError(f"{source.path} holds a {type(model).__name__}, which has no "
                         "language-model head: this command needs a causal language model "
                         "(an encoder classifies: --task classify)")
    if source.kind in (HUGGING_FACE, GGUF):   # the tokenizer of its files (a GGUF: its metadata)
        return model, Tokenizer.from_pretrained(source.path), {}
    run = read_run(source.path)
    return model, load_tokenizer(source.path, run), run


def check_options(variants, options) -> None:
    """Every option must be a config field of one of ``variants`` at least: one adapter and
    several trained together (``lowrank.multi.finetune_many``) check alike, and a misspelt
    option is an error, never dropped. Full fine-tuning takes no adapter options."""
    if "full" in variants:
        fields = set()
    else:
        fields = {f for v in variants for f in adapter_config(v).to_dict()} - {"variant"}
    unknown = sorted(set(options or {}) - fields)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for variant(s) {list(variants)}"
                         f"{near_fields(unknown, fields)}; fields: {sorted(fields)}")


def prepare_finetune(model, variant: str, targets, options: dict, seed: int = 0,
                     quantize: str | None = None):
    """Full fine-tuning (``variant="full"``) or an injected adapter of a registered variant;
    ``quantize="nf4"`` stores the frozen base in 4 bits under it (QLoRA, docs/variants.md#nf4)."""
    check_options([variant], options)
    if variant == "full":
        if quantize:
            raise ValueError("quantize needs an adapter variant: full fine-tuning trains the base")
        return None
    cfg = adapter_config(variant, **options)
    # a str is one regex (--regex): list() would split it into single characters
    inject(model, cfg, targets if isinstance(targets, str) else list(targets), seed=seed)
    if quantize:
        quantize_base(model, quantize)
    return cfg


def finetune(out, base, variant: str, targets=DEFAULT_TARGETS, options=None,
             data_spec: DataSpec | None = None, train: TrainConfig | None = None, *,
             dtype=None, backend_name=None, resume=False, save_every=0, progress=True,
             eval_data: dict | None = None, comm=None, force=False,
             quantize: str | None = None, allow_other_base: bool = False) -> RunResult:
    """Fine-tune ``base`` on ``data_spec``; ``eval_data`` maps names to extra TokenData to score
    (``force``: replace a run already in ``out``; ``resume``: continue it; ``quantize="nf4"``:
    QLoRA, the frozen base in NF4; ``allow_other_base``: resume on a base whose weights differ
    from the ones the run recorded)."""
    comm = SingleProcess() if comm is None else comm
    check_options([variant], options)   # before the base is read or out is touched
    out = prepare_out(out, resume=resume, force=force, base=base) if comm.is_root else Path(out)
    comm.barrier()
    return run_locked(out, comm.is_root, lambda where: _finetune(   # one writer, saves go
        where, base, variant, targets, options, data_spec, train, dtype,   # where it was opened
        backend_name, resume, save_every, progress, eval_data, comm, quantize, allow_other_base))


def _finetune(out, base, variant, targets, options, data_spec, train, dtype, backend_name,
              resume, save_every, progress, eval_data, comm, quantize,
              allow_other_base=False) -> RunResult:
    data_spec = data_spec or DataSpec(corpus="code")
    train = train or TrainConfig()
    check_options([variant], options)   # before the base is read
    source = base_source(base)   # config.json read here, once
    model, tok, base_run = load_base(source, dtype, backend_name)
    base_sha = base_weights_sha256(source)   # recorded: an adapter is for these weights only
    data = token_data(tok, data_spec, model.config.context)
    cfg = prepare_finetune(model, variant, targets, options or {}, seed=train.seed,
                           quantize=quantize)
    trainer = Trainer(model, data, train, comm=comm)
    history = []
    if resume:
        check_same_base(read_run(out), source, out, allow_other_base)
        history = _resume(out, trainer, lambda: _load_finetuned_weights(model, out, cfg))
    if isinstance(targets, str):   # a regex given on the command line: saved as the names
        targets = [name for name, _ in adapted_modules(model)]

    # a fine-tuned directory is usable on its own
    _root_only(comm)(lambda: tok.save(out / "tokenizer.json"))()

    @_root_only(comm)
    def save(tr):
        if cfg is None:
            checkpoint.save_model(model, out, train_state=tr.state_dict())
        else:
            checkpoint.save_adapter(model, out, train_state=tr.state_dict())
        _write_run(out, {"kind": "full" if cfg is None else "adapter", "base": str(base),
                         "base_path": str(Path(base).resolve()),
                         "variant": variant, "targets": list(targets),
                         "config": None if cfg is None else cfg.to_dict(),
                         "data": data_spec.__dict__, "train": train.to_dict(),
                         "quantize": quantize, BASE_SHA: base_sha,
                         "history": history})

    start = time.perf_counter()
    on_step = _checkpointer(out, trainer, save, save_every, progress)
    history += trainer.fit(on_step, progress, variant)
    elapsed = time.perf_counter() - start
    check_savable(trainer, on_step.saved)
    on_step.save(trainer)
    result = RunResult(out, history, trainer.evaluate()["loss"], model.num_parameters(True),
                       model.num_parameters(), _median_speed(history))
    result.seconds = elapsed
    result.model, result.trainer = model, trainer
    result.extra_eval = {name: trainer.evaluate(d)["loss"] for name, d in (eval_data or {}).items()}
    result.report = variant_report(model, out) if comm.is_root else []
    comm.barrier()
    return result


def variant_report(model, out) -> list[str]:
    """Lines (and files in ``out``) a variant reports after training, e.g. AdaLoRA's ranks:
    ``AdaptedLinear.report(model, out) -> list[str]`` (a classmethod), once per class."""
    lines, seen = [], set()
    for _, module in adapted_modules(model):
        if type(module) not in seen:
            seen.add(type(module))
            lines += type(module).report(model, Path(out))
    return lines


def load_finetuned(base, adapter_dir, dtype=None, backend_name=None,
                   allow_other_base: bool = False):
    """Base model with a saved fine-tune applied: an adapter directory or a full model (an
    adapter whose run recorded other base weights is refused unless ``allow_other_base``)."""
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter_dir}")
    run = read_run(adapter_dir)
    if run.get("kind") == "full":
        model, tok, _ = load_base(adapter_dir, dtype, backend_name)
        return model, tok
    if peft_files.is_peft_dir(adapter_dir):   # a PEFT directory (docs/peft.md#cli)
        model, tok, _ = load_base(base, dtype, backend_name)
        return peft_files.load_pretrained(model, adapter_dir), tok
    checkpoint.read_adapter_config(adapter_dir)   # before the base: fail early
    source = base_source(base)
    check_same_base(run, source, adapter_dir, allow_other_base)
    model, tok, _ = load_base(source, dtype, backend_name)
    peft_files.inject_saved(model, adapter_dir, seed=run.get("train", {}).get("seed", 0))
    if run.get("quantize"):   # the adapter was trained on this quantized base
        quantize_base(model, run["quantize"])
    checkpoint.load_adapter(model, adapter_dir)
    return model, tok


def _load_finetuned_weights(model, out, cfg):
    if cfg is None:
        checkpoint.load_weights(model, out)
    else:
        checkpoint.load_adapter(model, out)


def _extra_state(tr: Trainer) -> dict:
    """The Trainer's state beyond step, optimizer and rng: ``extra`` of
    ``checkpoint.save_training_state``, which ``_resume`` reads as well."""
    return {k: v for k, v in tr.state_dict().items() if k not in ("step", "optimizer", "rng")}


def _resume(out: Path, trainer: Trainer, load_weights) -> list:
    params = trainer.optimizer.params
    shapes = {f"{m}.{n}": p.shape for n, p in params.items()
              for m in ("exp_avg", "exp_avg_sq")}
    state = checkpoint.load_training_state(   # moments and hook statistics: a few copies
        out, shapes, cap_for(trainer.model.parameters(), copies=4))
    if state is None:
        raise ValueError(f"--resume: {out} holds no training state to resume from")
    load_weights()
    if "extra" in state:   # save_training_state's layout (and that of older workflows saves)
        state = {"tokens_seen": 0, **state.pop("extra"), **state}
    trainer.load_state_dict(state)
    return read_run(out).get("history", [])


def _median_speed(history) -> float:
    speeds = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    return float(np.median(speeds)) if speeds else float("nan")


def evaluate(model, data: TokenData, batch_size=16, batches=16) -> float:
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
    model.eval()
    xp = model.xp
    losses = [model.loss(backend.asarray(x, xp=xp), backend.asarray(y, xp=xp))[0]
              for x, y in data.eval_batches("val", batch_size, batches)]
    model.train()
    return float(np.mean(losses))


def generate(model, tok: Tokenizer, prompt: str, max_new_tokens=100, temperature=0.8,
             top_k=40, seed=0) -> str:
    """Sample a continuation (KV cache; the window slides over the last ``context`` tokens)."""
    for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    ids = [int(i) for i in tok.encode(prompt)] or [0]
    return tok.decode(generate_ids(model, ids, max_new_tokens, temperature, top_k,
                                   np.random.default_rng(seed)))


__all__ = ["DataSpec", "ModelSpec", "RunResult", "pretrain", "finetune", "load_base",
           "base_source",
           "load_finetuned", "evaluate", "generate", "prepare_finetune", "adapted_modules",
           "read_run"]
