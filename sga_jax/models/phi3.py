"""Phi-3 / Phi-3.5 (Abdin et al. 2024, arXiv 2404.14219) in Flax NNX, matching HF ``Phi3ForCausalLM``.

Llama's block (:mod:`sga_jax.models.llama`: RMSNorm, SiLU-gated MLP, no biases) with, in HF, q/k/v
fused into one ``qkv_proj`` and gate/up into one ``gate_up_proj``. Our modules keep the projections
apart (LoRA targets, K-FAC factors and tensor-parallel rules per projection); :data:`HF_FUSED` is the
one place that says how they are stacked, and ``hf.load_model`` / ``hf.save_model`` split and fuse.
Rope: ``rope_scaling`` "longrope" (alias "su"; HF maps the old "yarn" of Phi-3 configs to it too)
with ``short_factor`` / ``long_factor`` / ``original_max_position_embeddings`` / the attention
factor, and ``partial_rotary_factor`` (rotate the first ``factor · head_dim`` channels).
``sliding_window`` (Phi-3-mini-4k: 2047) windows every layer's attention, as HF's
``create_sliding_window_causal_mask``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sga_jax.errors import ModelLoadError
from sga_jax.models import layers as L
from sga_jax.models import llama

# Our unfused names are Llama's (the module paths are Llama's too).
HF_NAMES = {k: v for k, v in llama.HF_NAMES.items() if not k.endswith(".bias")}

_L = "model.layers.{i}"
# HF fused tensor -> the tensors of HF_NAMES stacked along its rows ([out, in] layout), in order:
# HF's Phi3Attention slices qkv as [q | k | v]; Phi3MLP chunks gate_up as [gate | up].
HF_FUSED: dict[str, tuple[str, ...]] = {
    f"{_L}.self_attn.qkv_proj.weight": (
        f"{_L}.self_attn.q_proj.weight",
        f"{_L}.self_attn.k_proj.weight",
        f"{_L}.self_attn.v_proj.weight",
    ),
    f"{_L}.mlp.gate_up_proj.weight": (f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"),
}

_ROPE_ALIASES = {"su": "longrope", "yarn": "longrope"}  # HF Phi3Config's backward compatibility


@dataclasses.dataclass(frozen=True)
class Phi3Config(llama.LlamaConfig):
    model_type: str = "phi3"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Phi3Config:
        for key in ("attention_bias", "mlp_bias"):  # not Phi3Config keys: HF would ignore them
            if hf.get(key):
                raise ModelLoadError(f"phi3 config key {key}=true is not supported (HF Phi-3 has no biases)")
        rope_hf = dict(hf)
        for key in ("rope_scaling", "rope_parameters"):
            params = dict(rope_hf.get(key) or {})
            for k in ("rope_type", "type"):
                if params.get(k) in _ROPE_ALIASES:
                    params[k] = _ROPE_ALIASES[params[k]]
            rope_hf[key] = params or None
        params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        base = super().from_hf(rope_hf)
        factor = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        if not 0.0 < factor <= 1.0:
            raise ModelLoadError(f"phi3 config key partial_rotary_factor={factor} must lie in (0, 1]")
        window = hf.get("sliding_window")
        return dataclasses.replace(
            base,
            rope=L.RopeConfig.from_hf(rope_hf, int(base.head_dim * factor)),
            sliding_window=int(window) if window else None,
            hf=dict(hf),
        )


class Phi3ForCausalLM(llama.LlamaForCausalLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
    HF_FUSED = HF_FUSED
