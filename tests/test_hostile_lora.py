"""PEFT adapters that ``load_adapter`` must take (issue 24): its refusal of non-float tensors must not
refuse the half-precision floats PEFT writes for a model cast to bfloat16 / float16 (numpy sees
bfloat16 as an ``ml_dtypes`` void-kind dtype). Reference: ``peft.PeftModel`` (peft 0.21) on the
transformers model, with the same half-precision adapter weights, computed in float32."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import write_tiny_hf

from sga_jax.models import hf
from sga_jax.models.lora import adapters, load_adapter

IDS = np.array([[5, 17, 33, 8, 91, 4, 60, 12], [7, 3, 44, 20, 71, 9, 0, 0]])
MASK = np.array([[1] * 8, [1] * 6 + [0] * 2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = write_tiny_hf("llama", tmp_path_factory.mktemp("hostile_lora") / "llama")
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_peft_adapter_loads_as_peft_computes_it(tiny, tmp_path, dtype):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():  # the adapter rounded to `dtype`, as a half-precision run saves it
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(getattr(torch, dtype)).float())
        want = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
        pm.to(getattr(torch, dtype)).save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert stored and {str(t.dtype) for t in stored.values()} == {f"torch.{dtype}"}
    model = load_adapter(hf.load_model(tiny), tmp_path / "adapter")
    assert len(adapters(model)) == 2 * base.config.num_hidden_layers
    m = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(model(IDS, MASK))[m], want[m], atol=1e-4)
