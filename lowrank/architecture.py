"""The layers of lowrank, bottom to top (docs/README.md#where-things-are).

A module may import modules of its own layer or of the layers below it. A name covers the
module or package and everything under it; the longest name that matches decides; the package
itself (``lowrank``, its ``__init__``) is matched exactly. ``tests/test_imports.py`` reads this
list without importing anything and fails on an upward import, a cycle, or a module in no layer.
"""

LAYERS = [
    ["lowrank._version", "lowrank.backend", "lowrank.architecture"],  # where arrays live
    ["lowrank.files"],             # files that survive crashes and hostile input; knows no model
    ["lowrank.text"],              # tokenizers, corpora, shipped data sets
    ["lowrank.nn", "lowrank.ops"],  # Parameter/Module, Linear, AdamW, hooks; forward/backward ops
    ["lowrank.models"],            # GPT, BERT, classifier heads, generation, HF key maps
    ["lowrank.adapters"],          # one file per variant, the registry, injection
    ["lowrank.multi"],             # many adapters over one base in one batch
    ["lowrank.quant", "lowrank.parallel"],   # frozen quantized bases; data parallel, shards
    ["lowrank.training"],          # the training loop and its update checks
    ["lowrank.formats"],           # model and adapter directories: lowrank, Hugging Face, PEFT
    ["lowrank.tasks"],             # what a model is trained for: classification, ...
    ["lowrank.app", "lowrank"],    # the command line, its workflows, demos; the public API
]
