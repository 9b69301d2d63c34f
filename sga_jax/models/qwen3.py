"""Qwen3 (Qwen Team 2025, arXiv 2505.09388) in Flax NNX, matching HF ``Qwen3ForCausalLM``.

Follows transformers' ``models/qwen3/modeling_qwen3.py`` (5.x): Llama's block
(:mod:`sga_jax.models.llama`) with

* QK-norm: an RMSNorm over each head's ``head_dim`` channels of q and of k (``Qwen3Attention``'s
  ``q_norm`` / ``k_norm``, weight ``[head_dim]``, Llama's RMSNorm: cast back, then times the
  weight), after the projections and before RoPE;
* no q/k/v bias (``attention_bias`` false in every released config; when true HF puts a bias on
  q, k, v *and* o, as Llama does);
* ``head_dim`` explicit (128 in every released size, ``Qwen3Config``'s default), not
  ``hidden_size / num_attention_heads``;
* tied embeddings at the small sizes (0.6B, 1.7B, 4B), untied above; rope theta 1e6;
* sliding-window layers as Qwen2 (``use_sliding_window``, ``max_window_layers``, ``layer_types``;
  off in every released config).

Qwen3-MoE (``qwen3_moe``) is refused with one ModelLoadError (:data:`sga_jax.models.REFUSED`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from sga_jax.models import layers as L
from sga_jax.models import llama, qwen2

_L = "model.layers.{i}"
HF_NAMES: dict[str, tuple[str, bool]] = {
    **llama.HF_NAMES,
    "layers.{i}.self_attn.q_norm.scale": (f"{_L}.self_attn.q_norm.weight", False),
    "layers.{i}.self_attn.k_norm.scale": (f"{_L}.self_attn.k_norm.weight", False),
}


@dataclasses.dataclass(frozen=True)
class Qwen3Config(llama.LlamaConfig):
    model_type: str = "qwen3"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Qwen3Config:
        # Qwen3Config's head_dim default is 128, not hidden_size / heads.
        base = super().from_hf({**hf, "head_dim": hf.get("head_dim") or 128})
        window, layers = qwen2.sliding_layers(hf, base.num_layers, "qwen3")
        return dataclasses.replace(base, mlp_bias=False, sliding_window=window, sliding_layers=layers)


class Qwen3DecoderLayer(llama.LlamaDecoderLayer):
    """Llama's layer whose attention normalises each head of q and k (RMSNorm over ``head_dim``)."""

    def __init__(self, c: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        # L.Attention applies q_norm / k_norm (None there: a static attribute, hence nnx.data).
        self.self_attn.q_norm = nnx.data(L.RMSNorm(c.head_dim, **norm))
        self.self_attn.k_norm = nnx.data(L.RMSNorm(c.head_dim, **norm))


class Qwen3ForCausalLM(llama.LlamaForCausalLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
    LAYER = Qwen3DecoderLayer
