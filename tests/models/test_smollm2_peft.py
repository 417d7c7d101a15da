"""A PEFT LoRA trained on the real SmolLM2-135M-Instruct in PyTorch (transformers reading the
installed GGUF) loads into lowrank's SmolLM2 and gives PEFT's logits. A few minutes: opt in
with LOWRANK_SLOW=1. Run with ``-s`` for the figure."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lowrank as lr  # noqa: E402
from lowrank import backend  # noqa: E402
from lowrank.files.locate import smollm2_file  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("LOWRANK_SLOW"),
                                 reason="slow: set LOWRANK_SLOW=1")]


def test_a_peft_lora_trained_on_smollm2_in_pytorch_loads_with_its_logits(tmp_path):
    try:
        path = smollm2_file()
    except ValueError as exc:
        pytest.skip(str(exc))
    tok = lr.Tokenizer.from_pretrained("smollm2")
    ids = tok.encode("LoRA adapts a frozen model with a low-rank update.").tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             lora_dropout=0.0)
    model = peft.get_peft_model(hf, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.tensor([ids])
    for _ in range(3):   # trained in PyTorch: B moves off zero
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits[0].numpy()
    model.save_pretrained(tmp_path / "adapter")

    ours = lr.load_pretrained(lr.from_pretrained("smollm2"), tmp_path / "adapter")
    ours.eval()
    logits, _ = ours.forward(backend.asarray(np.asarray([ids])))
    got = backend.to_numpy(logits)[0]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\nSmolLM2 + PEFT LoRA trained in PyTorch: logits rel. error {err:.2e}")
    assert err < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
