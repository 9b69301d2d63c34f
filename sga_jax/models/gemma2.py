"""Gemma 2 (Gemma Team 2024, arXiv 2408.00118) in Flax NNX, matching HF ``Gemma2ForCausalLM``.

Follows transformers' ``models/gemma2/modeling_gemma2.py`` (5.x):

* RMSNorm with ``(1 + w)`` (``Gemma2RMSNorm``: the weight is stored zero-centred; the product is
  taken in float32 and cast back, unlike Llama's);
* the token embedding scaled by ``√hidden_size``, the scale cast to the compute dtype first
  (``Gemma2TextScaledWordEmbedding``: √2304 = 48.0 in float32, 48.0 in bfloat16 too; √3072 -> 55.5);
* GeGLU MLP (``hidden_activation``, ``gelu_pytorch_tanh``);
* pre- and post-norms around attention and around the MLP (§2: "we use RMSNorm to normalize the
  input and output of each transformer sub-layer");
* attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped,
  ``cap · tanh(s / cap)`` with ``attn_logit_softcapping``, before the mask; final logits soft-capped
  with ``final_logit_softcapping`` (also in every log-prob path: :mod:`sga_jax.logprobs`);
* sliding-window attention on the layers ``layer_types`` marks ``sliding_attention`` (default, as
  ``Gemma2Config.__post_init__``: layer ``i`` slides when ``(i + 1) % 2``, i.e. even layers);
* ``head_dim`` independent of ``hidden_size / num_attention_heads``; tied embeddings by default.

Soft-capped attention is not in :func:`jax.nn.dot_product_attention`: it runs on the XLA path
(``model.attention=auto`` picks it; ``cudnn`` is refused). :mod:`sga_jax.models.gemma` reuses these
modules for Gemma 1 (no soft-capping, no post-norms, no windows, ``1/√head_dim``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ModelLoadError
from sga_jax.models import layers as L
from sga_jax.models import llama

_L = "model.layers.{i}"
HF_NAMES: dict[str, tuple[str, bool]] = {
    **llama.HF_NAMES,
    "layers.{i}.pre_feedforward_layernorm.scale": (f"{_L}.pre_feedforward_layernorm.weight", False),
    "layers.{i}.post_feedforward_layernorm.scale": (f"{_L}.post_feedforward_layernorm.weight", False),
}
HF_NAMES = {
    k: v for k, v in HF_NAMES.items() if not k.startswith("layers.{i}.mlp.") or not k.endswith(".bias")
}


@dataclasses.dataclass(frozen=True)
class Gemma2Config(llama.LlamaConfig):
    query_pre_attn_scalar: float | None = None  # attention scale ** -2 (None: head_dim)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    post_norms: bool = True  # Gemma 2's post-attention / post-feedforward norms (Gemma 1: none)
    model_type: str = "gemma2"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Gemma2Config:
        check_gemma(hf, "gemma2")
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in L.ACTIVATIONS:
            raise ModelLoadError(
                f"gemma2 config key hidden_activation={act!r} is not supported; "
                f"supported: {sorted(L.ACTIVATIONS)}"
            )
        tied = hf.get("tie_word_embeddings", True)  # Gemma2Config's default
        base = llama.LlamaConfig.from_hf({**hf, "hidden_act": act, "tie_word_embeddings": tied})
        window, flags = gemma2_layer_types(hf, base.num_layers)
        caps = {}
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = hf.get(key, 50.0 if key.startswith("attn") else 30.0)  # Gemma2Config's defaults
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
                raise ModelLoadError(f"gemma2 config key {key} must be null or a number > 0, got {cap!r}")
            caps[key] = None if cap is None else float(cap)
        scalar = hf.get("query_pre_attn_scalar", 256)
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
            raise ModelLoadError(
                f"gemma2 config key query_pre_attn_scalar must be a number > 0, got {scalar!r}"
            )
        inherited = {f.name: getattr(base, f.name) for f in dataclasses.fields(llama.LlamaConfig)}
        inherited.pop("model_type")
        return cls(
            **{
                **inherited,
                "sliding_window": window,
                "sliding_layers": flags,
                "query_pre_attn_scalar": float(scalar),
                **caps,
            }
        )


def check_gemma(hf: dict[str, Any], model_type: str) -> None:
    """Keys of the Gemma configs that change the model and are not implemented here."""
    if hf.get("use_bidirectional_attention"):
        raise ModelLoadError(
            f"{model_type} config key use_bidirectional_attention=true is not supported (causal LMs only)"
        )
    if hf.get("mlp_bias"):  # not a Gemma key: HF's Gemma MLP has no biases
        raise ModelLoadError(
            f"{model_type} config key mlp_bias=true is not supported (HF Gemma has no MLP biases)"
        )


def gemma2_layer_types(
    hf: dict[str, Any], num_layers: int, *, model_type: str = "gemma2", pattern: int = 2
) -> tuple[int | None, tuple[bool, ...]]:
    """``(sliding_window, per-layer flags)`` as HF's Gemma2Config / Gemma2Attention: ``layer_types``,
    else every ``pattern``-th layer global and the rest sliding (Gemma 2: alternating; Gemma 3: 5:1)."""
    types = hf.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    types = list(types)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown or len(types) != num_layers:
        raise ModelLoadError(
            f"{model_type} config key layer_types must list full_attention / sliding_attention for each of "
            f"the {num_layers} layers, got {len(types)} entries{f' with {unknown}' if unknown else ''}"
        )
    flags = tuple(t == "sliding_attention" for t in types)
    window = hf.get("sliding_window", 4096) if any(flags) else None
    if any(flags) and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ModelLoadError(
            f"{model_type} config key sliding_window must be a whole number >= 1 (sliding layers), "
            f"got {window!r}"
        )
    return window, flags


class GemmaRMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x²) + eps) · (1 + w)`` in float32, cast to the compute dtype after the
    product (HF ``Gemma2RMSNorm``); ``w`` (``scale`` here) is HF's zero-centred weight."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * L.expand_to(1.0 + self.scale[...].astype(jnp.float32), y.ndim)).astype(self.dtype)


class Gemma2DecoderLayer(nnx.Module):
    """``h = x + N_post_attn(Attn(N_in(x)))``; ``y = h + N_post_ff(MLP(N_pre_ff(h)))`` (Gemma 1:
    ``h = x + Attn(N_in(x))``; ``y = h + MLP(N_post_attn(h))``, Llama's order with Gemma's norm)."""

    def __init__(self, c: Gemma2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.post_norms = c.post_norms
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, **norm)
        self.self_attn = L.Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            qkv_bias=c.attention_bias,
            out_bias=c.attention_out_bias,
            scale=None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5,
            softcap=c.attn_logit_softcapping,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, **norm)
        if c.post_norms:
            self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, **norm)
            self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, **norm)
        self.mlp = llama.LlamaMLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope, mask, kv=None, cache_index=None):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, cache_index)
        if not self.post_norms:  # Gemma 1
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x)), kv
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), kv


class Gemma2ForCausalLM(llama.LlamaForCausalLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
    LAYER: type[nnx.Module] = Gemma2DecoderLayer  # Gemma 3: the same layer with QK-norm

    def __init__(
        self,
        config: Gemma2Config,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        scan_layers: bool = False,
        remat: str | None = None,
        attention: str = "auto",
    ):
        dtype, param_dtype = self._setup(config, dtype, param_dtype, scan_layers, remat, attention)
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = L.Embed(c.vocab_size, c.hidden_size, rngs=rngs, **kw)
        self.layers = L.make_layers(lambda r: self.LAYER(c, rngs=r, **kw), c.num_layers, rngs, scan_layers)
        self.norm = GemmaRMSNorm(c.hidden_size, eps=c.rms_norm_eps, **kw)
        self.lm_head = (
            None if c.tie_word_embeddings else L.Linear(c.hidden_size, c.vocab_size, rngs=rngs, **kw)
        )

    def _embed(self, input_ids, positions):
        # HF multiplies by the scale cast to the weights' dtype (√3072 is 55.5 in bfloat16).
        scale = jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
        return self.embed_tokens(input_ids) * scale
