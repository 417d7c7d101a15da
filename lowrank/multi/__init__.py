"""Many adapters trained together over one frozen base, in one process
(docs/training.md#multi-adapter).

``modules``: the shared model (``MultiAdapterLinear``, ``inject_multi``, ``AdapterView``, the
one-pass loss); ``train``: ``MultiTrainer`` and the ``finetune_many`` workflow. This package
sits above ``lowrank.app.workflows`` (it reuses its loading, checks and run files); data parallel
training is ``lowrank.parallel``, below the trainer.
"""
from .modules import (AdapterView, MultiAdapterLinear, inject_multi, multi_loss,
                      multi_loss_backward, multi_modules, set_groups)
from ..app.multi_run import MultiTrainer, finetune_many, parse_variants, subdir_names

__all__ = ["AdapterView", "MultiAdapterLinear", "inject_multi", "multi_loss",
           "multi_loss_backward", "multi_modules", "set_groups", "MultiTrainer",
           "finetune_many", "parse_variants", "subdir_names"]
