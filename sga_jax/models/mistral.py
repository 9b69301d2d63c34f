"""Mistral (Jiang et al. 2023, arXiv 2310.06825) in Flax NNX, matching HF ``MistralForCausalLM``.

Llama's block (:mod:`sga_jax.models.llama`: RMSNorm, SiLU-gated MLP, grouped-query attention, no
biases, HF's tensor names unchanged) with sliding-window attention on every layer (§2: each token
attends to the ``sliding_window`` positions up to and including itself; Mistral-7B-v0.1: 4096,
null in v0.2 / v0.3, which then is plain causal attention), as HF's
``create_sliding_window_causal_mask`` (transformers ``masking_utils.sliding_window_overlay``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sga_jax.errors import ModelLoadError
from sga_jax.models import llama

HF_NAMES = {k: v for k, v in llama.HF_NAMES.items() if not k.endswith(".bias")}  # no biases


@dataclasses.dataclass(frozen=True)
class MistralConfig(llama.LlamaConfig):
    model_type: str = "mistral"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> MistralConfig:
        for key in ("attention_bias", "mlp_bias"):  # not MistralConfig keys: HF would ignore them
            if hf.get(key):
                raise ModelLoadError(
                    f"mistral config key {key}=true is not supported (HF Mistral has no biases)"
                )
        if hf.get("layer_types") is not None:  # HF's Mistral ignores it (Ministral's alternation)
            raise ModelLoadError(
                "mistral config key layer_types is not supported (HF's MistralForCausalLM ignores it; "
                "per-layer attention types are Ministral's)"
            )
        window = hf.get("sliding_window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ModelLoadError(
                f"mistral config key sliding_window must be null or a whole number >= 1, got {window!r}"
            )
        return dataclasses.replace(super().from_hf(hf), sliding_window=window)


class MistralForCausalLM(llama.LlamaForCausalLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
