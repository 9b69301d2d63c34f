"""Gemma (Gemma Team 2024, arXiv 2403.08295) in Flax NNX, matching HF ``GemmaForCausalLM``.

Gemma 2's modules (:mod:`sga_jax.models.gemma2`) without what Gemma 2 added: Llama's pre-norm
block (no post-norms), ``1/√head_dim`` attention scale, no soft-capping, no sliding window; kept:
RMSNorm with ``(1 + w)``, GeGLU, the embedding scaled by ``√hidden_size``, tied embeddings.
As HF's ``GemmaConfig.__post_init__``, ``hidden_act="gelu"`` (the released configs' legacy value)
means the tanh approximation ``gelu_pytorch_tanh``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sga_jax.errors import ModelLoadError
from sga_jax.models import gemma2, llama
from sga_jax.models import layers as L

HF_NAMES = {k: v for k, v in gemma2.HF_NAMES.items() if "feedforward" not in k}


@dataclasses.dataclass(frozen=True)
class GemmaConfig(gemma2.Gemma2Config):
    post_norms: bool = False
    model_type: str = "gemma"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GemmaConfig:
        gemma2.check_gemma(hf, "gemma")
        act = hf.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
        if act not in L.ACTIVATIONS:
            raise ModelLoadError(
                f"gemma config key hidden_act={act!r} is not supported; supported: {sorted(L.ACTIVATIONS)}"
            )
        tied = hf.get("tie_word_embeddings", True)  # GemmaConfig's default
        base = llama.LlamaConfig.from_hf({**hf, "hidden_act": act, "tie_word_embeddings": tied})
        inherited = {f.name: getattr(base, f.name) for f in dataclasses.fields(llama.LlamaConfig)}
        inherited.pop("model_type")
        return cls(**{**inherited, "mlp_bias": False})


class GemmaForCausalLM(gemma2.Gemma2ForCausalLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
