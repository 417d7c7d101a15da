"""PEFT's entry points, spelled as PEFT users type them (docs/peft.md#peft-shaped-api):

    config = lr.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"])
    model = lr.get_peft_model(base, config)          # injects in place, returns a PeftModel
    model.print_trainable_parameters()
    logits = model(ids)                              # the forward output (no cache)
    model.save_pretrained("dir"); merged = model.merge_and_unload()
    with model.disable_adapter(): ...

Each config carries PEFT's field names (``lora_alpha``, ``lora_dropout``, ``use_rslora``,
``use_dora``, ``init_lora_weights``, ``target_modules``, ``task_type``, ``modules_to_save``)
and becomes a lowrank adapter config (``to_lowrank``); a misspelt field is a ValueError that
names the nearest one. The wrapper delegates everything else to the lowrank model, so
``model.loss``, ``model.forward``, ``model.named_parameters`` work as on the model itself.
"""
from __future__ import annotations

from ..adapters import (adapted_modules, add_adapter, config as adapter_config, disable_adapter,
                        inject, merge_and_unload, set_adapter, trainable_summary)
from ..adapters.base import PEFT_ALIASES
from ..adapters.inject import config_from_peft
from .peft_dir import load_pretrained, save_pretrained
from ..nn.validate import near_fields

# what PEFT targets when target_modules is left out, in lowrank's module names
DEFAULT_TARGETS = {"GPT": ["q", "k", "v"],          # PEFT's GPT-2 default: c_attn (q, k, v)
                   "Bert": ["query", "value"], "SequenceClassifier": ["query", "value"],
                   "Llama": ["q_proj", "v_proj"]}
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION", "TOKEN_CLS", "SEQ_2_SEQ_LM",
              "QUESTION_ANS")
PEFT_ONLY = ("target_modules", "task_type", "modules_to_save", "inference_mode",
             "base_model_name_or_path")


class PeftConfig:
    """A PEFT-shaped config of lowrank variant ``variant``: PEFT's field names, lowrank's
    checks. Fields PEFT has and lowrank does not implement are refused by name."""

    variant = "lora"
    peft_type = "LORA"
    defaults: dict = {}

    def __init__(self, **fields):
        own = {f for f in adapter_config(self.variant).to_dict()} - {"variant"}
        allowed = own | set(PEFT_ALIASES) | set(PEFT_ONLY) | set(self.defaults)
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown field(s) {unknown}"
                             f"{near_fields(unknown, allowed)}; fields: {sorted(allowed)}")
        values = {**self.defaults, "target_modules": None, "task_type": None,
                  "modules_to_save": None, "inference_mode": False,
                  "base_model_name_or_path": None, **fields}
        if values["task_type"] is not None and values["task_type"] not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got "
                             f"{values['task_type']!r}")
        targets = values["target_modules"]
        if targets is not None and not isinstance(targets, str) and not (
                isinstance(targets, (list, tuple, set))
                and all(isinstance(t, str) and t for t in targets)):
            raise ValueError(f"target_modules must be a list of module names or one regex "
                             f"string, got {targets!r}")
        vars(self).update(values)
        self.to_lowrank()        # every value checked now, not at get_peft_model

    def adapter_fields(self) -> dict:
        """The fields lowrank's config takes (PEFT's spellings translated by ``config``)."""
        return {k: v for k, v in vars(self).items() if k not in PEFT_ONLY}

    def to_lowrank(self):
        """The lowrank adapter config (``lr.adapters.config``) this config describes."""
        return adapter_config(self.variant, **self.adapter_fields())

    def to_dict(self) -> dict:
        return {"peft_type": self.peft_type, **vars(self)}

    def __repr__(self):
        inner = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({inner})"


class LoraConfig(PeftConfig):
    """PEFT's ``LoraConfig``: LoRA, rsLoRA (``use_rslora``), DoRA (``use_dora``); PEFT's
    defaults (``r=8, lora_alpha=8``); ``init_lora_weights``: True (PEFT's Kaiming-uniform A,
    zero B), "gaussian", "pissa", "pissa_niter_K", "olora"."""

    defaults = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False,
                "use_dora": False, "init_lora_weights": True}

    def adapter_fields(self) -> dict:
        fields = super().adapter_fields()
        init = fields.pop("init_lora_weights")
        if init is False:
            raise ValueError("init_lora_weights=False (a random B, an adapter that changes the "
                             "model at step 0) is not implemented; use True or 'gaussian'")
        if init is not True:
            fields["init"] = init
        return fields

    def to_lowrank(self):
        fields = self.adapter_fields()
        use_dora = fields.pop("use_dora")
        return adapter_config("lora", use_dora=use_dora, **fields)


def _config_class(name: str, variant: str, peft_type: str, defaults: dict, doc: str):
    return type(name, (PeftConfig,), {"variant": variant, "peft_type": peft_type,
                                      "defaults": defaults, "__doc__": doc})


AdaLoraConfig = _config_class("AdaLoraConfig", "adalora", "ADALORA", {"lora_alpha": 8},
                              "PEFT's ``AdaLoraConfig`` (``init_r``, ``target_r``, ...).")
VeraConfig = _config_class("VeraConfig", "vera", "VERA", {},
                           "PEFT's ``VeraConfig`` (``r``, ``projection_prng_key``, ...).")
LoHaConfig = _config_class("LoHaConfig", "loha", "LOHA", {}, "PEFT's ``LoHaConfig``.")
LoKrConfig = _config_class("LoKrConfig", "lokr", "LOKR", {}, "PEFT's ``LoKrConfig``.")


def _targets(model, config: PeftConfig):
    if config.target_modules is not None:
        targets = config.target_modules
        return targets if isinstance(targets, str) else list(targets)
    name = type(model).__name__
    if name not in DEFAULT_TARGETS:
        raise ValueError(f"target_modules: no default for a {name}; name the modules "
                         "(e.g. target_modules=['q', 'v'])")
    return DEFAULT_TARGETS[name]


def _adapted_part(model):
    """Where the adapters go: a classifier's encoder (its head is trained whole, PEFT's
    ``modules_to_save``), any other model itself."""
    return model.encoder if type(model).__name__ == "SequenceClassifier" else model


class PeftModel:
    """A lowrank model with adapters, with PEFT's ``PeftModel`` methods; every other
    attribute is the model's own (``forward``, ``loss``, ``named_parameters``, ...)."""

    def __init__(self, model, peft_config: PeftConfig, adapter_name: str = "default"):
        self.base_model = model
        self.peft_config = {adapter_name: peft_config}
        self.active_adapter = adapter_name

    @classmethod
    def from_pretrained(cls, model, directory, adapter_name: str = "default", seed: int = 0):
        """Load the adapter directory (PEFT's format or lowrank's) into ``model``."""
        load_pretrained(model, directory, seed=seed)
        return cls(model, None, adapter_name)

    def __getattr__(self, name):
        if name in ("base_model", "peft_config", "active_adapter"):   # not yet set
            raise AttributeError(name)
        return getattr(self.base_model, name)

    def __call__(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def get_base_model(self):
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        m = self.base_model
        return m.num_parameters(trainable_only=True), m.num_parameters()

    def print_trainable_parameters(self) -> None:
        print(trainable_summary(self.base_model))

    def save_pretrained(self, directory, **kwargs):
        """PEFT's adapter directory (``lr.adapters.save_pretrained``)."""
        return save_pretrained(self.base_model, directory, **kwargs)

    def merge_and_unload(self):
        """The adapters folded into the weights; returns the plain lowrank model."""
        return merge_and_unload(self.base_model)

    def disable_adapter(self):
        """``with model.disable_adapter():`` the base model's outputs."""
        return disable_adapter(_adapted_part(self.base_model))

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, seed: int = 0):
        part = _adapted_part(self.base_model)
        add_adapter(part, adapter_name, peft_config.to_lowrank(), _targets(self.base_model,
                                                                           peft_config), seed)
        self.peft_config[adapter_name] = peft_config
        self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        set_adapter(_adapted_part(self.base_model), adapter_name)
        self.active_adapter = adapter_name

    def __repr__(self):
        return f"PeftModel(active_adapter={self.active_adapter!r},\n{self.base_model!r})"


def get_peft_model(model, peft_config, adapter_name: str = "default", seed: int = 0):
    """Inject ``peft_config``'s adapters into ``model`` (in place, as PEFT does) and wrap it.
    ``peft_config``: a ``LoraConfig`` & co., or a PEFT ``adapter_config.json`` dict."""
    if isinstance(peft_config, dict):
        cfg, targets = config_from_peft(peft_config)
        peft_config = LoraConfig(**{k: peft_config[k] for k in ("r", "lora_alpha")
                                    if k in peft_config}, target_modules=targets or None)
    elif isinstance(peft_config, PeftConfig):
        cfg, targets = peft_config.to_lowrank(), _targets(model, peft_config)
    else:
        raise ValueError(f"peft_config must be a LoraConfig (or another lr.*Config) or a "
                         f"PEFT config dict, got {type(peft_config).__name__}")
    saved = peft_config.modules_to_save
    if saved and type(model).__name__ != "SequenceClassifier":
        raise ValueError(f"modules_to_save={saved!r}: lowrank trains a whole module only as "
                         "a SequenceClassifier's head (always trained)")
    part = _adapted_part(model)
    if adapted_modules(part):
        raise ValueError("the model holds adapters already; add one more with "
                         "PeftModel.add_adapter(name, config)")
    inject(part, cfg, targets, seed=seed)
    wrapped = PeftModel(model, peft_config, adapter_name)
    if adapter_name != "default":
        part.active_adapter = adapter_name
    return wrapped


__all__ = ["PeftConfig", "LoraConfig", "AdaLoraConfig", "VeraConfig", "LoHaConfig",
           "LoKrConfig", "PeftModel", "get_peft_model"]
