"""OPT (Zhang et al. 2022, arXiv 2205.01068) in Flax NNX, matching HF ``OPTForCausalLM``.

Decoder layer with LayerNorm before (``do_layer_norm_before``, OPT-125m/1.3b/2.7b/...) or after
(OPT-350m) each sub-block: ``h = x + Attn(LN(x))``, ``y = h + fc2(relu(fc1(LN(h))))``. Learned
positions with HF's offset of 2, computed from the attention mask
(``pos = cumsum(mask) * mask - 1 + 2``); ``word_embed_proj_dim`` ≠ ``hidden_size`` adds the
``project_in`` / ``project_out`` matrices (OPT-350m). The LM head is tied to the embedding by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sga_jax.models import layers as L

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (fairseq legacy)

# Module path (``{i}`` = layer) -> (HF safetensors name, transpose).
_LAYER = "model.decoder.layers.{i}"
HF_NAMES: dict[str, tuple[str, bool]] = {
    "embed_tokens.embedding": ("model.decoder.embed_tokens.weight", False),
    "embed_positions.embedding": ("model.decoder.embed_positions.weight", False),
    "project_in.kernel": ("model.decoder.project_in.weight", True),
    "project_out.kernel": ("model.decoder.project_out.weight", True),
    "final_layer_norm.scale": ("model.decoder.final_layer_norm.weight", False),
    "final_layer_norm.bias": ("model.decoder.final_layer_norm.bias", False),
    "lm_head.kernel": ("lm_head.weight", True),
    **{
        f"layers.{{i}}.self_attn.{ours}.{p}": (f"{_LAYER}.self_attn.{theirs}.{hp}", p == "kernel")
        for ours, theirs in [
            ("q_proj", "q_proj"),
            ("k_proj", "k_proj"),
            ("v_proj", "v_proj"),
            ("o_proj", "out_proj"),
        ]
        for p, hp in [("kernel", "weight"), ("bias", "bias")]
    },
    **{
        f"layers.{{i}}.{m}.{p}": (f"{_LAYER}.{m}.{hp}", p == "kernel")
        for m in ("fc1", "fc2")
        for p, hp in [("kernel", "weight"), ("bias", "bias")]
    },
    **{
        f"layers.{{i}}.{m}.{p}": (f"{_LAYER}.{m}.{hp}", False)
        for m in ("self_attn_layer_norm", "final_layer_norm")
        for p, hp in [("scale", "weight"), ("bias", "bias")]
    },
}


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    model_type: str = "opt"
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> OPTConfig:
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_dim=hf["ffn_dim"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
            do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
            remove_final_layer_norm=bool(hf.get("_remove_final_layer_norm", False)),
            enable_bias=bool(hf.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
            activation_function=hf.get("activation_function", "relu"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf=dict(hf),
        )


class OPTDecoderLayer(nnx.Module):
    def __init__(self, c: OPTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        affine = c.layer_norm_elementwise_affine
        norm = dict(eps=1e-5, use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=param_dtype)
        kw = dict(use_bias=c.enable_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre_norm = c.do_layer_norm_before
        self.act = c.activation_function
        self.self_attn = L.Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_attention_heads,
            c.head_dim,
            qkv_bias=c.enable_bias,
            out_bias=c.enable_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.self_attn_layer_norm = L.LayerNorm(c.hidden_size, **norm)
        self.fc1 = L.Linear(c.hidden_size, c.ffn_dim, **kw)
        self.fc2 = L.Linear(c.ffn_dim, c.hidden_size, **kw)
        self.final_layer_norm = L.LayerNorm(c.hidden_size, **norm)

    def __call__(self, x, rope, mask, kv=None, cache_index=None):
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        h, kv = self.self_attn(h, None, mask, kv, cache_index)
        x = x + h
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(L.activation(self.act)(self.fc1(h)))
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x, kv


class OPTForCausalLM(L.DecoderLM):
    """``model(input_ids, attention_mask) -> logits [B, T, V]`` float32 (see docs/interfaces.md)."""

    HF_NAMES = HF_NAMES

    def __init__(
        self,
        config: OPTConfig,
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
        self.embed_tokens = L.Embed(c.vocab_size, c.word_embed_proj_dim, **kw)
        self.embed_positions = L.Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, **kw)
        if c.word_embed_proj_dim != c.hidden_size:
            self.project_in = L.Linear(c.word_embed_proj_dim, c.hidden_size, **kw)
            self.project_out = L.Linear(c.hidden_size, c.word_embed_proj_dim, **kw)
        else:
            self.project_in = self.project_out = None
        self.layers = L.make_layers(
            lambda r: OPTDecoderLayer(c, dtype=dtype, param_dtype=param_dtype, rngs=r),
            c.num_layers,
            rngs,
            scan_layers,
        )
        if c.do_layer_norm_before and not c.remove_final_layer_norm:
            affine = c.layer_norm_elementwise_affine
            self.final_layer_norm = L.LayerNorm(
                c.hidden_size, use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=param_dtype
            )
        else:
            self.final_layer_norm = None
        self.lm_head = None if c.tie_word_embeddings else L.Linear(c.word_embed_proj_dim, c.vocab_size, **kw)

    def _positions(self, attention_mask):
        """HF: ``cumsum(mask) * mask - 1`` (padding gets -1, i.e. table row 1 after the offset)."""
        m = attention_mask.astype(jnp.int32)
        return jnp.cumsum(m, axis=1) * m - 1

    def _embed(self, input_ids, positions):
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + POSITION_OFFSET)

    def _final(self, x):
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def lm_head_weights(self):
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T, None
        return self.lm_head.kernel[...], None

    def _logits(self, h):
        if self.lm_head is not None:
            return self.lm_head(h, out_dtype=jnp.float32)
        return super()._logits(h)
