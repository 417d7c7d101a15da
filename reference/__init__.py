"""Oracles for the parity tests: independent implementations that share no code with lowrank.

* ``naive``       — dense float64 NumPy formulas (LoRA forward and gradients, Eckart–Young,
  AdaLoRA's importance/budget/mask, IncreLoRA's module score and growth choice);
* ``finite_diff`` — central differences and a host-side relative error;
* ``torch_twin``  — a LoRA linear written directly in torch, for autograd gradients;
* ``peft_parity`` — the same layer built by PEFT (huggingface/peft), the reference semantics;
* ``torch_gpt``   — a torch twin of the mini GPT (docs/models.md#gpt), under the same rule;
* ``official``    — the authors' update rules (SoRA's SparseAdamW, RoSA's two runs,
  IncreLoRA's allocator, ReLoRA's jagged schedule) transcribed naively in NumPy.

Rule: nothing under ``reference/`` may import ``lowrank`` (an oracle that reuses the code it
checks proves nothing). Arrays cross the boundary as host NumPy arrays.
"""
