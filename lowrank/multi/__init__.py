"""Many adapters over one frozen base in one process (docs/training.md#multi-adapter): the
shared model (``MultiAdapterLinear``, ``inject_multi``, ``AdapterView``) and the one-pass loss.
Training them together is ``lowrank.app.multi_run`` (``MultiTrainer``, ``finetune_many``).
"""
from .modules import (AdapterView, MultiAdapterLinear, inject_multi, multi_loss,
                      multi_loss_backward, multi_modules, set_groups)

__all__ = ["AdapterView", "MultiAdapterLinear", "inject_multi", "multi_loss",
           "multi_loss_backward", "multi_modules", "set_groups"]
