"""Qwen2 / Qwen2.5 (Yang et al. 2024, arXiv 2407.10671) in Flax NNX, matching HF ``Qwen2ForCausalLM``.

Llama's block (:mod:`sga_jax.models.llama`) with biases on q, k and v but not on o_proj, no MLP
bias, and HF's tensor names unchanged; the small sizes (0.5B-3B) tie the LM head to the embedding,
all use rope theta 1e6. Sliding-window attention (``use_sliding_window``, off in every released
Qwen2 / Qwen2.5 config) is refused with an error naming the key until the ports support it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sga_jax.errors import ModelLoadError
from sga_jax.models import llama

HF_NAMES = llama.HF_NAMES  # the same tensor names as Llama


@dataclasses.dataclass(frozen=True)
class Qwen2Config(llama.LlamaConfig):
    model_type: str = "qwen2"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Qwen2Config:
        if hf.get("use_sliding_window"):
            raise ModelLoadError(
                "qwen2 config key use_sliding_window=true is not supported (no sliding-window "
                "attention yet); set it to false only if your sequences are shorter than sliding_window"
            )
        sliding = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
        if sliding:
            raise ModelLoadError(f"qwen2 config key layer_types: {sliding} layers are not supported")
        base = super().from_hf(hf)
        # HF's Qwen2Attention: q/k/v with bias, o_proj without; the MLP has none (keys ignored by HF).
        return dataclasses.replace(base, attention_bias=True, attention_out_bias=False, mlp_bias=False)


class Qwen2ForCausalLM(llama.LlamaForCausalLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
