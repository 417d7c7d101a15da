"""Training many adapters over one frozen base at once: ``MultiTrainer`` and ``finetune_many``.

    lowrank finetune --base base --variant lora,dora,adalora --out runs
    lowrank finetune --base base --variant lora,lora:r=4:lr=1e-3,sora --out runs

Adapter k is an ordinary ``Trainer`` over ``AdapterView(model, k)`` with its own data,
TrainConfig (lr, schedule, steps, batch size, accumulation, seed), AdamW and hooks; only the
forward/backward are shared (``modules.multi_loss``: one pass over the concatenated batch, the
loss Σ_k mean cross-entropy of group k, so each adapter's gradient is the one it gets alone).
Per step: every adapter still training samples its micro-batches with its own RNG, the
shared forward/backward fills every adapter's gradients, then each trainer finishes its own
step (``Trainer.finish_step``: extra_loss → clip → AdamW → after_step → zero-grad). Adapters
may have different step counts: a finished one leaves the batch.

``finetune_many`` writes adapter k into ``<out>/<variant>`` (``<out>/<k>-<variant>`` when a
variant occurs twice), each directory exactly what ``workflows.finetune`` writes for that
adapter alone (``workflows.load_finetuned`` loads it; ``--resume`` resumes it), plus
``<out>/run.json`` listing them. Only a single process: data parallel is a separate mode.
The CLI passes plain values (variants, options, DataSpec, TrainConfig); options are checked
as ``workflows.finetune`` checks a single adapter's (``workflows.check_options``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from itertools import zip_longest

from .. import backend
from ..formats import checkpoint
from . import workflows as wf
from ..adapters import config as adapter_config, field_from_text
from ..training.progress import progress_bar
from .run_dir import prepare_out
from .run_lock import hold_if
from ..training.trainer import NonFiniteLossError, Trainer, TrainConfig
from ..training.update_check import check_update
from ..multi.modules import AdapterView, inject_multi, multi_loss, multi_loss_backward

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


class MultiTrainer:
    """``MultiTrainer(model, runs, names=None)``: ``model`` built by ``inject_multi``; ``runs``
    one ``(data, TrainConfig)`` per adapter index 0..K-1 (optionally ``(data, config, hooks)``)."""

    def __init__(self, model, runs, names=None):
        self.model = model
        self.views, self.trainers = [], []
        for k, run in enumerate(runs):
            data, config, *hooks = run
            if config.shards > 1:
                raise ValueError(f"shards={config.shards}: several adapters at once share one "
                                 "forward over their joined batches; batch shards split one "
                                 "adapter's batch (train them one at a time, or use shards=1)")
            view = AdapterView(model, k)
            self.views.append(view)
            self.trainers.append(Trainer(view, data, config, hooks=hooks[0] if hooks else None))
        self.names = list(names) if names is not None else [str(k) for k in range(len(runs))]
        contexts = {tr.data.context for tr in self.trainers}
        if len(contexts) > 1:
            raise ValueError(f"every adapter's data needs one context length, got {contexts}")
        self.step = 0

    def active(self) -> list[int]:
        return [k for k, tr in enumerate(self.trainers) if tr.step < tr.config.steps]

    def train_step(self) -> dict:
        """One step of every adapter still training: ``{adapter index: record}``."""
        active = self.active()
        if not active:
            return {}
        start = time.perf_counter()
        losses = dict.fromkeys(active, 0.0)
        for micro in range(max(self.trainers[k].config.accum_steps for k in active)):
            batches, scale = [], []
            for k in active:
                tr = self.trainers[k]
                if micro < tr.config.accum_steps:
                    batch = tr.batch("train", tr.rng)   # a TokenBatch: one LM context
                    batches.append((k, batch.x, batch.y))
                    scale.append(1.0 / tr.config.accum_steps)
            micro_losses, cache = multi_loss(self.model, batches)
            for (k, x, _), loss, s in zip(batches, micro_losses, scale):
                tr = self.trainers[k]
                if not math.isfinite(loss):
                    raise NonFiniteLossError(f"adapter {self.names[k]}: loss is {loss} at step "
                                             f"{tr.step}; stopping (lower its lr, or use "
                                             "--dtype float64); the last good checkpoint is kept")
                losses[k] += loss * s
                tr.tokens_seen += int(x.size)
            multi_loss_backward(self.model, cache, scale)
        records = {k: self.trainers[k].finish_step(losses[k], start) for k in active}
        seconds = time.perf_counter() - start
        for k, record in records.items():   # the shared step's time, this adapter's tokens
            c = self.trainers[k].config
            record["seconds"] = seconds
            record["tokens_per_s"] = c.accum_steps * c.batch_size * self.trainers[k].data.context \
                / seconds
        self.step += 1
        return records

    def evaluate(self, split: str = "val") -> list[float]:
        """Each adapter's mean loss over its ``eval_batches`` (dropout off), its batches of
        all adapters concatenated into one forward per round."""
        self.model.eval()
        sums, counts = [0.0] * len(self.trainers), [0] * len(self.trainers)
        streams = [tr.data.eval_batches(split, tr.config.batch_size, tr.config.eval_batches)
                   for tr in self.trainers]
        xp = self.model.xp
        for round_ in zip_longest(*streams):
            batches = [(k, backend.asarray(b[0], xp=xp), backend.asarray(b[1], xp=xp))
                       for k, b in enumerate(round_) if b is not None]
            losses, _ = multi_loss(self.model, batches)
            for (k, _, _), loss in zip(batches, losses):
                sums[k] += loss
                counts[k] += 1
        self.model.train()
        return [s / n if n else float("nan") for s, n in zip(sums, counts)]

    def fit(self, on_step=None, progress: bool = True) -> list[list[dict]]:
        """Train every adapter to its ``steps``; ``on_step(k, trainer, record)`` after each of
        adapter k's steps (checkpoints). Returns each adapter's history."""
        histories = [[] for _ in self.trainers]
        total = max(tr.config.steps - tr.step for tr in self.trainers)
        bar = progress_bar(total, f"{len(self.trainers)} adapters", progress, leave=False)
        while self.active():
            records = self.train_step()
            for k, record in records.items():
                tr = self.trainers[k]
                if tr.config.eval_interval and tr.step % tr.config.eval_interval == 0:
                    record["val_loss"] = tr.evaluate()["loss"]
                histories[k].append(record)
                if on_step is not None:
                    on_step(k, tr, record)
            bar.set_postfix(loss="/".join(f"{r['loss']:.3f}" for r in records.values()),
                            tok_s=f"{sum(r['tokens_per_s'] for r in records.values()):.0f}")
            bar.update(1)
        bar.close()
        return histories


# --- the workflow --------------------------------------------------------------------------

def parse_variants(spec: str) -> list[tuple[str, dict]]:
    """``"lora,lora:r=4:lr=1e-3,adalora"`` -> ``[(variant, {field: value})]``; values are
    JSON when they parse as JSON (numbers, true/false), else strings."""
    out = []
    for item in spec.split(","):
        name, *pairs = item.strip().split(":")
        if not name:
            raise ValueError(f"--variant: empty adapter name in {spec!r}")
        if name == "full":
            raise ValueError("--variant: 'full' fine-tuning cannot share a frozen base with "
                             "other adapters; run it on its own")
        fields = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--variant: expected key=value after {name!r}, got {pair!r}")
            field, fields[field] = field_from_text(key, value)
        out.append((name, fields))
    return out


def subdir_names(variants) -> list[str]:
    names = [v for v, _ in variants]
    if len(set(names)) == len(names):
        return names
    return [f"{k}-{v}" for k, v in enumerate(names)]


def _adapter_options(variant: str, shared: dict, own: dict) -> dict:
    """The shared options the variant's config has, then its own (which must all fit)."""
    fields = set(adapter_config(variant).to_dict()) - {"variant"}
    return {**{k: v for k, v in shared.items() if k in fields}, **own}


def finetune_many(out, base, variants, targets=wf.DEFAULT_TARGETS, options=None,
                  data_spec=None, train: TrainConfig | None = None, *, dtype=None,
                  backend_name=None, resume=False, save_every=0, progress=True, force=False):
    """Fine-tune ``variants`` (``[(variant, {config or TrainConfig field: value})]``) of
    ``base`` together. Shared ``options`` go to every variant whose config has the field
    (each option must fit at least one); adapter k's TrainConfig is ``train`` with
    ``seed + k`` and its own overrides. Returns one ``RunResult`` per adapter."""
    data_spec = data_spec or wf.DataSpec(corpus="code")
    train = train or TrainConfig()
    options = dict(options or {})
    variants = [(v, dict(f)) for v, f in variants]
    wf.check_options([v for v, _ in variants], options)   # as a single adapter's options
    out = prepare_out(out, resume=resume, force=force, base=base)
    with hold_if(out, True) as where:   # one writer; saves go where --out was opened
        source = wf.base_source(base)   # config.json read here, once
        model, tok, _ = wf.load_base(source, dtype, backend_name)
        base_sha = wf.base_weights_sha256(source)
        data = wf.token_data(tok, data_spec, model.config.context)
        configs, trains = [], []
        for k, (variant, fields) in enumerate(variants):
            own_train = {f: fields.pop(f) for f in list(fields) if f in _TRAIN_FIELDS}
            trains.append(dataclasses.replace(train, **{"seed": train.seed + k, **own_train}))
            configs.append(adapter_config(variant, **_adapter_options(variant, options, fields)))
        targets = targets if isinstance(targets, str) else list(targets)   # a str: one regex
        inject_multi(model, [(cfg, targets, tc.seed) for cfg, tc in zip(configs, trains)])
        names = subdir_names(variants)
        trainer = MultiTrainer(model, [(data, tc) for tc in trains], names)
        dirs = [where / name for name in names]
        histories = [[] for _ in variants]
        for k, directory in enumerate(dirs):
            directory.mkdir(parents=True, exist_ok=True)
            tok.save(directory / "tokenizer.json")
            if resume:
                histories[k] = wf._resume(directory, trainer.trainers[k],
                                          lambda v=trainer.views[k], d=directory:
                                          checkpoint.load_adapter(v, d))

        def save(k, tr):
            checkpoint.save_adapter(trainer.views[k], dirs[k], train_state=tr.state_dict())
            wf._write_run(dirs[k], {"kind": "adapter", "base": str(base), "variant": variants[k][0],
                                    "targets": targets, "config": configs[k].to_dict(),
                                    "data": data_spec.__dict__, "train": trains[k].to_dict(),
                                    "history": histories[k], wf.BASE_SHA: base_sha,
                                    "multi": {"index": k, "of": len(variants), "parent": str(out)}})

        def on_step(k, tr, record):
            check_update(tr)   # before anything of this step is written
            histories[k].append(record)
            if save_every and (tr.step % save_every == 0 or tr.step == tr.config.steps):
                save(k, tr)

        start = time.perf_counter()
        trainer.fit(on_step, progress)
        elapsed = time.perf_counter() - start
        for k, tr in enumerate(trainer.trainers):
            check_update(tr)
            save(k, tr)
        wf._write_run(where, {"kind": "multi", "base": str(base), "adapters": names,
                              "variants": [v for v, _ in variants], "seconds": elapsed})
        val = trainer.evaluate()
        results = []
        for k, tr in enumerate(trainer.trainers):
            view = trainer.views[k]
            result = wf.RunResult(out / names[k], histories[k], val[k], view.num_parameters(True),
                                  view.num_parameters(), wf._median_speed(histories[k]))
            result.seconds, result.model, result.trainer = elapsed, view, tr
            result.report = wf.variant_report(view, dirs[k])
            results.append(result)
        return results


__all__ = ["MultiTrainer", "finetune_many", "parse_variants", "subdir_names"]
