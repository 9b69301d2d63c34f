"""Llama (Touvron et al. 2023, arXiv 2302.13971) in Flax NNX, matching HF ``LlamaForCausalLM``.

Pre-norm decoder: ``h = x + Attn(RMSNorm(x))``; ``y = h + W_down(silu(W_gate RMSNorm(h)) ⊙ W_up RMSNorm(h))``.
Covers grouped-query attention, explicit ``head_dim``, the HF rope types default / linear / llama3 /
dynamic, ``tie_word_embeddings``, ``attention_bias``, ``mlp_bias`` and the RMSNorm epsilon.

The same modules serve Qwen2 (:mod:`sga_jax.models.qwen2`: q/k/v bias without an o_proj bias) and
Phi-3 (:mod:`sga_jax.models.phi3`: fused projections in HF, LongRoPE); those files hold only their
config mapping and name table, in the style of jax-ml/bonsai.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ModelLoadError
from sga_jax.models import layers as L

# Module path (``{i}`` = layer) -> (HF safetensors name, transpose). Kernels are [in, out] here and
# [out, in] in HF, hence the transposes.
HF_NAMES: dict[str, tuple[str, bool]] = {
    "embed_tokens.embedding": ("model.embed_tokens.weight", False),
    "layers.{i}.input_layernorm.scale": ("model.layers.{i}.input_layernorm.weight", False),
    "layers.{i}.self_attn.q_proj.kernel": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "layers.{i}.self_attn.q_proj.bias": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "layers.{i}.self_attn.k_proj.kernel": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "layers.{i}.self_attn.k_proj.bias": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "layers.{i}.self_attn.v_proj.kernel": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "layers.{i}.self_attn.v_proj.bias": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "layers.{i}.self_attn.o_proj.kernel": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "layers.{i}.self_attn.o_proj.bias": ("model.layers.{i}.self_attn.o_proj.bias", False),
    "layers.{i}.post_attention_layernorm.scale": (
        "model.layers.{i}.post_attention_layernorm.weight",
        False,
    ),
    "layers.{i}.mlp.gate_proj.kernel": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "layers.{i}.mlp.gate_proj.bias": ("model.layers.{i}.mlp.gate_proj.bias", False),
    "layers.{i}.mlp.up_proj.kernel": ("model.layers.{i}.mlp.up_proj.weight", True),
    "layers.{i}.mlp.up_proj.bias": ("model.layers.{i}.mlp.up_proj.bias", False),
    "layers.{i}.mlp.down_proj.kernel": ("model.layers.{i}.mlp.down_proj.weight", True),
    "layers.{i}.mlp.down_proj.bias": ("model.layers.{i}.mlp.down_proj.bias", False),
    "norm.scale": ("model.norm.weight", False),
    "lm_head.kernel": ("lm_head.weight", True),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: L.RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases
    attention_out_bias: bool = False  # o_proj bias (Llama: = attention_bias; Qwen2: none)
    mlp_bias: bool = False
    # Sliding-window attention (Mistral, Phi-3, Qwen2): keys within the last ``sliding_window``
    # positions; on the layers flagged in ``sliding_layers`` (None: every layer).
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    hidden_act: str = "silu"
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    model_type: str = "llama"
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        check_supported(hf, cls.model_type)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=L.RopeConfig.from_hf(hf, head_dim),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            attention_out_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf=dict(hf),
        )


def check_supported(hf: dict[str, Any], model_type: str) -> None:
    """One ModelLoadError naming the first config key whose value these ports do not implement."""
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
        if float(hf.get(key) or 0.0) != 0.0:  # unlearning trains: a dropout we skip changes the model
            raise ModelLoadError(
                f"{model_type} config key {key}={hf[key]} is not supported (sga_jax applies no dropout)"
            )
    act = hf.get("hidden_act", "silu")
    if act not in L.ACTIVATIONS:
        raise ModelLoadError(
            f"{model_type} config key hidden_act={act!r} is not supported; supported: {sorted(L.ACTIVATIONS)}"
        )


class LlamaMLP(nnx.Module):
    def __init__(self, c: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = L.Linear(c.hidden_size, c.intermediate_size, **kw)
        self.up_proj = L.Linear(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = L.Linear(c.intermediate_size, c.hidden_size, **kw)
        self.act = c.hidden_act

    def __call__(self, x):
        return self.down_proj(L.activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, c: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = L.RMSNorm(c.hidden_size, **norm)
        self.self_attn = L.Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            qkv_bias=c.attention_bias,
            out_bias=c.attention_out_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.post_attention_layernorm = L.RMSNorm(c.hidden_size, **norm)
        self.mlp = LlamaMLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope, mask, kv=None, cache_index=None):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaForCausalLM(L.DecoderLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES
    LAYER: type[nnx.Module] = LlamaDecoderLayer  # Qwen3: the same layer with QK-norm

    def __init__(
        self,
        config: LlamaConfig,
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
        self.embed_tokens = L.Embed(
            c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = L.make_layers(
            lambda r: self.LAYER(c, dtype=dtype, param_dtype=param_dtype, rngs=r),
            c.num_layers,
            rngs,
            scan_layers,
        )
        self.norm = L.RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = L.Linear(
                c.hidden_size, c.vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

    def _embed(self, input_ids, positions):
        return self.embed_tokens(input_ids)

    def _rope(self, positions):
        return self.config.rope(positions)

    def _final(self, x):
        return self.norm(x)

    def lm_head_weights(self):
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T, None
        return self.lm_head.kernel[...], None

    def _logits(self, h):
        if self.lm_head is not None:  # through the Linear, so K-FAC hooks see the head too
            return L.softcap_logits(self.lm_head(h, out_dtype=jnp.float32), self.logit_softcap)
        return super()._logits(h)
