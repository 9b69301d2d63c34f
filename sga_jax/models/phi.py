"""Phi-1 / 1.5 / 2 (Li et al. 2023, arXiv 2309.05463) in Flax NNX, matching HF ``PhiForCausalLM``.

Parallel block on one shared LayerNorm: ``y = x + Attn(LN(x)) + fc2(gelu_new(fc1(LN(x))))``;
partial rotary embedding (the first ``partial_rotary_factor · head_dim`` channels), biases
everywhere, optional per-head ``qk_layernorm``, a final LayerNorm and an ``lm_head`` with bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ModelLoadError
from sga_jax.models import layers as L

_LAYER = "model.layers.{i}"
# Module path (``{i}`` = layer) -> (HF safetensors name, transpose).
HF_NAMES: dict[str, tuple[str, bool]] = {
    "embed_tokens.embedding": ("model.embed_tokens.weight", False),
    "final_layernorm.scale": ("model.final_layernorm.weight", False),
    "final_layernorm.bias": ("model.final_layernorm.bias", False),
    "lm_head.kernel": ("lm_head.weight", True),
    "lm_head.bias": ("lm_head.bias", False),
    "layers.{i}.input_layernorm.scale": (f"{_LAYER}.input_layernorm.weight", False),
    "layers.{i}.input_layernorm.bias": (f"{_LAYER}.input_layernorm.bias", False),
    **{
        f"layers.{{i}}.{ours}.{p}": (f"{_LAYER}.{theirs}.{hp}", p == "kernel")
        for ours, theirs in [
            ("self_attn.q_proj", "self_attn.q_proj"),
            ("self_attn.k_proj", "self_attn.k_proj"),
            ("self_attn.v_proj", "self_attn.v_proj"),
            ("self_attn.o_proj", "self_attn.dense"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]
        for p, hp in [("kernel", "weight"), ("bias", "bias")]
    },
    **{
        f"layers.{{i}}.self_attn.{ours}.{p}": (f"{_LAYER}.self_attn.{theirs}.{hp}", False)
        for ours, theirs in [("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")]
        for p, hp in [("scale", "weight"), ("bias", "bias")]
    },
}


@dataclasses.dataclass(frozen=True)
class PhiConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    rope: L.RopeConfig
    qk_layernorm: bool = False
    hidden_act: str = "gelu_new"
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    tie_word_embeddings: bool = False
    model_type: str = "phi"
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> PhiConfig:
        heads = hf["num_attention_heads"]
        head_dim = hf["hidden_size"] // heads
        params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        if hf.get("tie_word_embeddings"):
            raise ModelLoadError("phi with tie_word_embeddings=True is not supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            rope=L.RopeConfig.from_hf(hf, int(head_dim * factor)),
            qk_layernorm=bool(hf.get("qk_layernorm", False)),
            hidden_act=hf.get("hidden_act", "gelu_new"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf=dict(hf),
        )


class PhiMLP(nnx.Module):
    def __init__(self, c: PhiConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = L.Linear(c.hidden_size, c.intermediate_size, **kw)
        self.fc2 = L.Linear(c.intermediate_size, c.hidden_size, **kw)
        self.act = c.hidden_act

    def __call__(self, x):
        return self.fc2(L.activation(self.act)(self.fc1(x)))


class PhiDecoderLayer(nnx.Module):
    def __init__(self, c: PhiConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = L.LayerNorm(
            c.hidden_size, eps=c.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.self_attn = L.Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            qkv_bias=True,
            out_bias=True,
            qk_norm_eps=c.layer_norm_eps if c.qk_layernorm else None,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.mlp = PhiMLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope, mask, kv=None, cache_index=None):
        h = self.input_layernorm(x)
        a, kv = self.self_attn(h, rope, mask, kv, cache_index)
        return x + a + self.mlp(h), kv


class PhiForCausalLM(L.DecoderLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES

    def __init__(
        self,
        config: PhiConfig,
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
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = L.Embed(c.vocab_size, c.hidden_size, **kw)
        self.layers = L.make_layers(
            lambda r: PhiDecoderLayer(c, dtype=dtype, param_dtype=param_dtype, rngs=r),
            c.num_layers,
            rngs,
            scan_layers,
        )
        self.final_layernorm = L.LayerNorm(
            c.hidden_size, eps=c.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.lm_head = L.Linear(c.hidden_size, c.vocab_size, use_bias=True, **kw)

    def _embed(self, input_ids, positions):
        return self.embed_tokens(input_ids)

    def _rope(self, positions):
        return self.config.rope(positions)

    def _final(self, x):
        return self.final_layernorm(x)

    def lm_head_weights(self):
        return self.lm_head.kernel[...], self.lm_head.bias[...]

    def _logits(self, h):
        return self.lm_head(h, out_dtype=jnp.float32)
