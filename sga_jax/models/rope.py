"""Rotary position embedding (Su et al. 2021, arXiv 2104.09864) with HF's ``rope_type`` scalings.

Moved out of :mod:`sga_jax.models.layers` (issue 14: no module over 600 lines); ``layers`` re-exports
:class:`RopeConfig` and :func:`apply_rope`. Computed in float32, as HF does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sga_jax.errors import ModelLoadError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (Su et al. 2021, arXiv 2104.09864) with HF's ``rope_type``s.

    ``dim`` is the number of rotated channels per head (``partial_rotary_factor * head_dim`` for Phi).
    Supported: ``default``, ``linear`` (positions / factor), ``llama3`` (Llama 3.1 frequency bands),
    ``dynamic`` (NTK-aware base growth once the sequence exceeds the trained length), ``longrope``
    (Phi-3 / 3.5, Ding et al. 2024, arXiv 2402.13753: per-frequency ``short_factor`` rescaling, or
    ``long_factor`` once the batch's longest position passes ``original_max_position_embeddings``,
    and cos / sin multiplied by ``attention_factor``, as HF's ``_compute_longrope_parameters``).
    """

    dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 2048
    max_position_embeddings: int = 2048
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    SUPPORTED = ("default", "linear", "llama3", "dynamic", "longrope")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], dim: int) -> RopeConfig:
        """Read ``rope_parameters`` (transformers ≥ 5) or ``rope_theta`` + ``rope_scaling`` (older)."""
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in cls.SUPPORTED:
            raise ModelLoadError(
                f"unsupported rope_type {rope_type!r}; supported: {', '.join(cls.SUPPORTED)}"
            )
        max_pos = int(hf.get("max_position_embeddings", 2048))
        # A top-level original_max_position_embeddings (Phi-3) wins, as in HF's standardize_rope_params.
        original = int(
            hf.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or max_pos
        )
        longrope: dict[str, Any] = {}
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(params.get(key) or ()) != dim // 2:
                    raise ModelLoadError(
                        f"rope_scaling key {key} must list {dim // 2} factors (rotary dim {dim} / 2), "
                        f"got {len(params.get(key) or ())}"
                    )
            # HF: factor defaults to max / original positions; attention_factor to
            # sqrt(1 + ln(factor) / ln(original)) when factor > 1, else 1.
            factor = params.get("factor") or max_pos / original
            attention = params.get("attention_factor")
            if attention is None:
                attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
            longrope = dict(
                short_factor=tuple(float(f) for f in params["short_factor"]),
                long_factor=tuple(float(f) for f in params["long_factor"]),
                attention_factor=float(attention),
            )
        return cls(
            dim=dim,
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor") or 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
            max_position_embeddings=max_pos,
            **longrope,
        )

    def inv_freq(self, long: bool = False) -> np.ndarray:
        """The static inverse frequencies ``θ^(-2i/dim)`` after linear / llama3 / longrope scaling
        (longrope: the short factors, or the long ones when ``long``)."""
        inv = 1.0 / (self.theta ** (np.arange(0, self.dim, 2, dtype=np.float64) / self.dim))
        if self.rope_type == "longrope":
            inv = inv / np.asarray(self.long_factor if long else self.short_factor, np.float64)
        elif self.rope_type == "linear":
            inv = inv / self.factor
        elif self.rope_type == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen = old / self.low_freq_factor
            high_wavelen = old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)

    def __call__(self, positions: Array) -> tuple[Array, Array]:
        """positions ``[B, T]`` -> ``(cos, sin)`` each ``[B, T, dim]`` float32 (HF's half layout)."""
        pos = positions.astype(jnp.float32)
        if self.rope_type == "dynamic":
            # HF recomputes the base from the longest sequence in the batch (max position + 1).
            seq_len = jnp.maximum(jnp.max(pos) + 1.0, float(self.max_position_embeddings))
            base = self.theta * (
                self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            ) ** (self.dim / (self.dim - 2))
            exps = jnp.arange(0, self.dim, 2, dtype=jnp.float32) / self.dim
            inv = 1.0 / (base**exps)
        elif self.rope_type == "longrope":
            # HF switches the whole batch on its longest sequence (max position + 1).
            long = jnp.max(pos) + 1.0 > self.original_max_position_embeddings
            inv = jnp.where(long, jnp.asarray(self.inv_freq(long=True)), jnp.asarray(self.inv_freq()))
        else:
            inv = jnp.asarray(self.inv_freq())
        freqs = pos[..., None] * jnp.reshape(inv, (1,) * pos.ndim + inv.shape)  # as layers.expand_to
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        if self.attention_factor != 1.0:
            return jnp.cos(emb) * self.attention_factor, jnp.sin(emb) * self.attention_factor
        return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first ``cos.shape[-1]`` channels of ``x [B, T, N, H]`` (HF ``rotate_half`` layout)."""
    rot = cos.shape[-1]
    x32 = x.astype(jnp.float32)
    x_rot, x_pass = x32[..., :rot], x32[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    if x_pass.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out.astype(x.dtype)


@struct.dataclass
class LayerRope:
    """Two RoPE tables, one for the full-attention layers and one for the sliding ones (Gemma 3:
    a global base with its scaling, a local base); :meth:`for_layer` picks one by the layer's
    (traced, under scan) flag, as :meth:`sga_jax.models.attention.AttentionMask.for_layer` does."""

    full: tuple[Array, Array]
    local: tuple[Array, Array]

    def for_layer(self, sliding: Array | bool) -> tuple[Array, Array]:
        if isinstance(sliding, (bool, np.bool_)):
            return self.local if sliding else self.full
        return (
            jnp.where(sliding, self.local[0], self.full[0]),
            jnp.where(sliding, self.local[1], self.full[1]),
        )
