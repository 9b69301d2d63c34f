"""Qwen2 / Qwen2.5 (Yang et al. 2024, arXiv 2407.10671) in Flax NNX, matching HF ``Qwen2ForCausalLM``.

Llama's block (:mod:`sga_jax.models.llama`) with biases on q, k and v but not on o_proj, no MLP
bias, and HF's tensor names unchanged; the small sizes (0.5B-3B) tie the LM head to the embedding,
all use rope theta 1e6. Sliding-window attention (``use_sliding_window``, off in every released
Qwen2 / Qwen2.5 config) follows HF's ``Qwen2Config``: on layers ``i >= max_window_layers`` (or as
``layer_types`` says), with the window ``sliding_window``.
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
        base = super().from_hf(hf)
        window, layers = sliding_layers(hf, base.num_layers, "qwen2")
        # HF's Qwen2Attention: q/k/v with bias, o_proj without; the MLP has none (keys ignored by HF).
        return dataclasses.replace(
            base,
            attention_bias=True,
            attention_out_bias=False,
            mlp_bias=False,
            sliding_window=window,
            sliding_layers=layers,
        )


def sliding_layers(
    hf: dict[str, Any], num_layers: int, model_type: str
) -> tuple[int | None, tuple[bool, ...]]:
    """HF Qwen2Config's rule: the window is ``sliding_window`` only when ``use_sliding_window``;
    ``layer_types`` when given, else layer ``i`` slides when ``i >= max_window_layers``."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ModelLoadError(
            f"{model_type} config key sliding_window must be a whole number >= 1, got {window!r}"
        )
    types = hf.get("layer_types")
    if types is None:
        start = int(hf.get("max_window_layers", 28))
        types = [
            "sliding_attention" if window is not None and i >= start else "full_attention"
            for i in range(num_layers)
        ]
    types = list(types)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown or len(types) != num_layers:
        raise ModelLoadError(
            f"{model_type} config key layer_types must list full_attention / sliding_attention for each of "
            f"the {num_layers} layers, got {len(types)} entries{f' with {unknown}' if unknown else ''}"
        )
    flags = tuple(t == "sliding_attention" for t in types)
    if any(flags) and window is None:  # HF's create_sliding_window_causal_mask raises here too
        raise ModelLoadError(
            f"{model_type} config key layer_types has sliding_attention layers but no sliding_window is set"
            + (" (use_sliding_window is false)" if model_type == "qwen2" else "")
        )
    return window, flags


class Qwen2ForCausalLM(llama.LlamaForCausalLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
