"""Gemma 3 text models (Gemma Team 2025, arXiv 2503.19786) in Flax NNX, matching HF
``Gemma3ForCausalLM``.

Follows transformers' ``models/gemma3/modeling_gemma3.py`` and ``configuration_gemma3.py`` (5.x).
Gemma 2's block (:mod:`sga_jax.models.gemma2`: ``(1 + w)`` RMSNorm, √d embedding scaling, GeGLU,
pre- and post-norms around attention and MLP, scores scaled by ``query_pre_attn_scalar ** -0.5``)
with what Gemma 3 changed (§2 of the report):

* QK-norm in place of attention soft-capping: Gemma's ``(1 + w)`` RMSNorm over each head's
  ``head_dim`` channels of q and k, before RoPE (``Gemma3Attention.q_norm`` / ``k_norm``); both
  soft-caps default to none (``Gemma3TextConfig``); a final-logit cap is applied when a config
  sets one, an attention cap is refused (transformers applies it only in eager attention, its
  default sdpa ignores it, so there is no one reference);
* 5:1 interleaved local / global attention: layer ``i`` is local (sliding window ``sliding_window``,
  512 in the released models) unless ``(i + 1) % sliding_window_pattern == 0`` (pattern 6), or as
  ``layer_types`` lists them;
* two RoPE bases: ``rope_local_base_freq`` (10k) on the local layers, ``rope_theta`` (1M) with
  ``rope_scaling`` (linear, factor 8 for the 4B-27B models) on the global ones; transformers 5
  writes both as ``rope_parameters = {"full_attention": ..., "sliding_attention": ...}``, also read;
* tied embeddings by default.

``model_type`` ``gemma3`` (the multimodal checkpoints): the ``text_config`` and the language
model's tensors (``model.language_model.*``, or ``language_model.model.*`` in the older layout);
the vision tower and projector are ignored. Such a model is exported as ``gemma3_text``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from flax import nnx

from sga_jax.errors import ModelLoadError
from sga_jax.models import gemma2, llama
from sga_jax.models import layers as L
from sga_jax.models.sources import TensorSource

_L = "model.layers.{i}"
HF_NAMES: dict[str, tuple[str, bool]] = {
    **gemma2.HF_NAMES,
    "layers.{i}.self_attn.q_norm.scale": (f"{_L}.self_attn.q_norm.weight", False),
    "layers.{i}.self_attn.k_norm.scale": (f"{_L}.self_attn.k_norm.weight", False),
}
_TYPES = ("full_attention", "sliding_attention")


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A ``gemma3`` (multimodal) config -> its ``gemma3_text`` part; a text config unchanged."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ModelLoadError("gemma3 config has no text_config object (the language model's config)")
    out = {**text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in out and key in hf:
            out[key] = hf[key]
    return out


def layer_types(hf: dict[str, Any], num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """``(sliding_window, per-layer flags)`` as ``Gemma3TextConfig.__post_init__``: Gemma 2's rule
    with every ``sliding_window_pattern``-th layer global (default 6)."""
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    if hf.get("layer_types") is None and (
        isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1
    ):
        raise ModelLoadError(
            f"gemma3_text config key sliding_window_pattern must be a whole number >= 1, got {pattern!r}"
        )
    return gemma2.gemma2_layer_types(hf, num_layers, model_type="gemma3_text", pattern=pattern)


def ropes(hf: dict[str, Any], head_dim: int) -> tuple[L.RopeConfig, L.RopeConfig]:
    """``(global, local)`` RoPE: transformers 5's per-type ``rope_parameters``, or the released
    configs' ``rope_theta`` + ``rope_scaling`` (global) and ``rope_local_base_freq`` (local)."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelLoadError("gemma3_text config key rope_parameters must be an object")
    if set(params) & set(_TYPES):
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full, local = {**(hf.get("rope_scaling") or {}), **params}, {}
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    max_pos = hf.get("max_position_embeddings", 131_072)
    return tuple(  # type: ignore[return-value]
        L.RopeConfig.from_hf({"rope_parameters": p, "max_position_embeddings": max_pos}, head_dim)
        for p in (full, local)
    )


@dataclasses.dataclass(frozen=True)
class Gemma3Config(gemma2.Gemma2Config):
    rope_local: L.RopeConfig | None = None  # the sliding layers' RoPE (``rope``: the global layers')
    model_type: str = "gemma3_text"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Gemma3Config:
        hf = text_config(hf)
        gemma2.check_gemma(hf, "gemma3_text")
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in L.ACTIVATIONS:
            raise ModelLoadError(
                f"gemma3_text config key hidden_activation={act!r} is not supported; "
                f"supported: {sorted(L.ACTIVATIONS)}"
            )
        tied = hf.get("tie_word_embeddings", True)  # Gemma3TextConfig's default
        flat = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling")}
        base = llama.LlamaConfig.from_hf({**flat, "hidden_act": act, "tie_word_embeddings": tied})
        window, flags = layer_types(hf, base.num_layers)
        rope, rope_local = ropes(hf, base.head_dim)
        if hf.get("attn_logit_softcapping") is not None:
            # transformers applies it in eager attention only (sdpa, its default, ignores it): no
            # one reference to match, and no released Gemma 3 sets it.
            raise ModelLoadError(
                "gemma3_text config key attn_logit_softcapping is not supported (null in every released "
                "Gemma 3; transformers applies it only with eager attention)"
            )
        cap = hf.get("final_logit_softcapping")  # Gemma3TextConfig's default: none
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
            raise ModelLoadError(
                f"gemma3_text config key final_logit_softcapping must be null or a number > 0, got {cap!r}"
            )
        caps = dict(attn_logit_softcapping=None, final_logit_softcapping=None if cap is None else float(cap))
        scalar = hf.get("query_pre_attn_scalar", 256)
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
            raise ModelLoadError(
                f"gemma3_text config key query_pre_attn_scalar must be a number > 0, got {scalar!r}"
            )
        inherited = {f.name: getattr(base, f.name) for f in dataclasses.fields(llama.LlamaConfig)}
        inherited.pop("model_type")
        return cls(
            **{
                **inherited,
                "hf": dict(hf),
                "rope": rope,
                "rope_local": rope_local,
                "sliding_window": window,
                "sliding_layers": flags,
                "query_pre_attn_scalar": float(scalar),
                **caps,
            }
        )


class Gemma3DecoderLayer(gemma2.Gemma2DecoderLayer):
    """Gemma 2's layer whose attention normalises each head of q and k (Gemma's ``(1 + w)`` RMSNorm)."""

    def __init__(self, c: Gemma3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        # L.Attention applies q_norm / k_norm (None there: a static attribute, hence nnx.data).
        self.self_attn.q_norm = nnx.data(gemma2.GemmaRMSNorm(c.head_dim, **norm))
        self.self_attn.k_norm = nnx.data(gemma2.GemmaRMSNorm(c.head_dim, **norm))


# The language model's tensors in multimodal gemma3 checkpoints (transformers 5, then older).
_TEXT_PREFIXES = (re.compile(r"^model\.language_model\."), re.compile(r"^language_model\.model\."))
_VISION = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


class TextPartSource(TensorSource):
    """A multimodal Gemma 3 checkpoint's text tensors under ``Gemma3ForCausalLM``'s names; the
    vision tower and projector are left out."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.names_map: dict[str, str] = {}
        for name in source.names():
            if _VISION.match(name):
                continue
            new = name
            for rx in _TEXT_PREFIXES:
                new = rx.sub("model.", new)
            new = re.sub(r"^language_model\.lm_head\.", "lm_head.", new)
            self.names_map[new] = name

    def names(self) -> set[str]:
        return set(self.names_map)

    def get(self, name: str) -> np.ndarray:
        return self.source.get(self.names_map[name])

    def close(self) -> None:
        self.source.close()


class Gemma3ForCausalLM(gemma2.Gemma2ForCausalLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
    LAYER = Gemma3DecoderLayer

    @staticmethod
    def adapt_source(source: TensorSource) -> TensorSource:
        return TextPartSource(source)

    def _rope(self, positions):
        c = self.config
        _, flags = self._windows()
        if flags is None:  # one kind of layer: every layer slides, or none does
            every = c.sliding_window is not None and all(c.sliding_layers or ())
            return (c.rope_local if every else c.rope)(positions)
        return L.LayerRope(full=c.rope(positions), local=c.rope_local(positions))


__all__ = ["Gemma3Config", "Gemma3ForCausalLM", "TextPartSource"]
