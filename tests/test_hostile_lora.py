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


@pytest.fixture(scope="module")
def peft_adapter(tiny, tmp_path_factory):
    """A float32 PEFT adapter (random A and B) written by peft itself."""
    import peft
    import torch
    import transformers

    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    peft.get_peft_model(base, cfg).save_pretrained(out)
    return out


def _huge(folder, kind: str) -> None:
    """Finite adapters whose update ``(alpha / r) · B A`` overflows float32."""
    import json

    from safetensors.numpy import load_file, save_file

    if kind == "alpha":
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["lora_alpha"] = 1e39  # finite in JSON and Python, inf as float32
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    else:  # every value 1e20: each finite, their product (1e40 · 2 · 4) is not
        weights = folder / "adapter_model.safetensors"
        tensors = {k: np.full_like(v, 1e20) for k, v in load_file(weights).items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["alpha", "values"])
def test_an_adapter_whose_update_overflows_is_refused(tiny, peft_adapter, tmp_path, kind):
    """Before: ``lora_alpha: 1e39`` or values of 1e20 loaded, and the model computed NaN (no error)."""
    import shutil

    from sga_jax.errors import SgaJaxError
    from sga_jax.models.lora import has_lora

    bad = shutil.copytree(peft_adapter, tmp_path / "bad")
    _huge(bad, kind)
    model = hf.load_model(tiny)
    with pytest.raises(SgaJaxError, match="overflows float32") as e:
        load_adapter(model, bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    assert not has_lora(model)
    load_adapter(model, peft_adapter)  # the intact adapter loads on the same model
    assert np.isfinite(np.asarray(model(IDS, MASK))).all()


def test_a_lora_scale_that_overflows_is_one_line_before_the_run(tmp_path, capsys, smollm2_tokenizer):
    """``model.lora.alpha=1e39 model.lora.rank=1``: before, the run started and blamed the starting
    model ("raise train.max_forget_nll"), leaving files behind; now one line names alpha."""
    import json

    from tiny_models import write_tiny_llama_for

    from sga_jax.cli import main

    model, _ = write_tiny_llama_for(smollm2_tokenizer, tmp_path / "tiny")
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"question": "What is fact 1?", "answer": "Fact 1 is 7."}) + "\n")
    out = tmp_path / "run"
    argv = ["unlearn", "benchmark=jsonl", f"data.forget={forget}", f"model.path={model}", f"output_dir={out}",
            "method=ga", "train.steps=1", "train.batch_size=1", "train.progress=false",
            "model.lora.targets=[q_proj]", "model.lora.alpha=1e39", "model.lora.rank=1"]  # fmt: skip
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sga-jax")]
    assert len(err) == 1 and "LoRA alpha 1e+39" in err[0] and "overflows float32" in err[0], err
    assert not out.exists()
