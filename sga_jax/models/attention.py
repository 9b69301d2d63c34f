"""Attention masks and the attention kernel choice (XLA or cuDNN flash attention).

:func:`attention_implementation` picks ``xla`` (float32 softmax, a boolean mask ``[B, 1, T, S]``)
or ``cudnn`` (causal + per-row key lengths, no dense mask; right-padded forwards only), an
:class:`AttentionMask` carries either form to every layer, and :func:`attend` runs it. Moved out of
:mod:`sga_jax.models.layers` (issue 14: no module over 600 lines); ``layers`` re-exports the public
names and keeps the :class:`~sga_jax.models.layers.Attention` module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from sga_jax.errors import ConfigError

Array = jax.Array


def _in_window(query_slot: Array, slots: Array, window: int | None) -> Array:
    """``[t, S]``: key slot within the last ``window`` positions of the query slot (itself included),
    HF's ``sliding_window_overlay`` (``kv_idx > q_idx - sliding_window``); all true without a window.
    Slots are sequence indices (padding included), in a full forward and in the KV cache alike."""
    if window is None:
        return jnp.ones((query_slot.shape[0], slots.shape[0]), bool)
    return slots[None, :] > query_slot[:, None] - window


def forward_mask(attention_mask: Array, window: int | None = None) -> Array:
    """Causal ∧ key-is-real (∧ in the sliding window) mask ``[B, 1, T, T]``; each query also sees
    itself so that no row is fully masked (padding queries would otherwise give NaN gradients on
    some backends)."""
    t = attention_mask.shape[1]
    idx = jnp.arange(t)
    causal = (idx[None, :] <= idx[:, None]) & _in_window(idx, idx, window)
    keys = attention_mask.astype(bool)[:, None, None, :]
    return (causal[None, None] & keys) | jnp.eye(t, dtype=bool)[None, None]


def decode_mask(kv_mask: Array, cache_index: Array, t: int, window: int | None = None) -> Array:
    """Mask ``[B, 1, t, S]`` for t new tokens written at slots ``[cache_index, cache_index + t)``
    (with a ``window``: only the last ``window`` slots up to each query's own). ``cache_index`` is
    one slot for the batch or one per row ``[B]`` (continuous batching: each row at its own place)."""
    s = kv_mask.shape[1]
    slots = jnp.arange(s)[None, None, :]  # [1, 1, S]
    index = jnp.asarray(cache_index).reshape(-1, 1)  # [1 or B, 1]
    query_slot = (index + jnp.arange(t)[None, :])[:, :, None]  # [1 or B, t, 1]
    causal = slots <= query_slot
    if window is not None:  # HF's sliding_window_overlay: kv_idx > q_idx - sliding_window
        causal = causal & (slots > query_slot - window)
    own = slots == query_slot
    return ((causal & kv_mask.astype(bool)[:, None, :]) | own)[:, None]


def write_cache(cache: Array, new: Array, cache_index: Array) -> Array:
    """``new [B, t, ...]`` written into ``cache [B, S, ...]`` at slot ``cache_index``: one slot for
    the batch (a ``dynamic_update_slice``) or one per row ``[B]``."""
    new = new.astype(cache.dtype)
    if jnp.ndim(cache_index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, cache_index) + (0,) * (cache.ndim - 2))

    def row(c: Array, n: Array, i: Array) -> Array:
        return jax.lax.dynamic_update_slice(c, n, (i,) + (0,) * (c.ndim - 1))

    return jax.vmap(row)(cache, new, cache_index)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# cuDNN's fused (flash) attention: half-precision inputs, head_dim a multiple of 8 and at most 128
# (jax._src.cudnn.fused_attention_stablehlo checks the same and raises otherwise).
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128


def _cuda_gpu() -> bool:
    """True when JAX's default backend is an NVIDIA GPU (not ROCm, not CPU/TPU)."""
    try:
        if jax.default_backend() != "gpu":
            return False
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    except RuntimeError:
        return False
    return "rocm" not in version


def _cudnn_unsupported(
    dtype: Any, head_dim: int, softcap: bool = False, mixed_windows: bool = False
) -> str | None:
    """Why cuDNN flash attention cannot run this model here (None when it can)."""
    if softcap:  # jax.nn.dot_product_attention has no logit soft-capping
        return "does not support attention logit soft-capping (the config's attn_logit_softcapping)"
    if mixed_windows:  # one static local_window_size per call; per-layer windows need the mask
        return "does not support sliding windows on some layers only (the config's layer_types)"
    if not _cuda_gpu():
        return f"needs a CUDA GPU, but JAX's default backend is {jax.default_backend()!r}"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return f"needs model.dtype bfloat16 or float16, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return f"needs head_dim a multiple of 8 and <= {_CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    return None


def attention_implementation(
    name: str, dtype: Any, head_dim: int, *, softcap: bool = False, mixed_windows: bool = False
) -> str:
    """``auto`` | ``xla`` | ``cudnn`` -> the implementation to run (``"xla"`` or ``"cudnn"``).

    ``auto`` is cuDNN on a CUDA GPU with a bfloat16 / float16 compute dtype and a supported
    ``head_dim``, for a model without attention soft-capping (Gemma 2) or per-layer windows, else
    XLA. ``cudnn`` where it cannot run raises one ConfigError saying why.
    """
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"unknown attention implementation {name!r}; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if name == "xla":
        return "xla"
    why = _cudnn_unsupported(dtype, head_dim, softcap, mixed_windows)
    if name == "cudnn" and why is not None:
        raise ConfigError(f"model.attention=cudnn {why}; use model.attention=auto or xla")
    return "xla" if why is not None else "cudnn"


def _use_lengths(implementation: str) -> bool:
    """Whether a plain forward passes causal + key lengths (cuDNN) rather than the dense mask.
    XLA keeps the dense mask: it is exact for any padding and XLA's own causal/length path builds
    the same [B, 1, T, T] mask internally (no saving). A seam for the tests."""
    return implementation == "cudnn"


@struct.dataclass
class AttentionMask:
    """How a layer masks attention, in one of two forms.

    * ``dense``: boolean ``[B, 1, T, S]`` (any padding; KV-cache decode), run by XLA;
    * ``kv_lengths``: int32 ``[B]``, causal attention over the first ``kv_lengths[b]`` keys of row
      ``b`` (right padding only), run by ``implementation`` with ``is_causal=True`` and no mask
      array: cuDNN's flash kernel then never materialises a ``[B, N, T, T]`` score tensor;
      ``window`` (static) is then the sliding window of every layer, passed as ``local_window_size``.

    Sliding windows on some layers only (Qwen2's ``max_window_layers``, Gemma 2's alternation):
    ``dense`` is the full-attention mask and ``dense_local`` the windowed one;
    :meth:`for_layer` picks one by the layer's (traced, under scan) flag.
    """

    dense: Array | None = None
    kv_lengths: Array | None = None
    dense_local: Array | None = None
    window: int | None = struct.field(pytree_node=False, default=None)
    implementation: str = struct.field(pytree_node=False, default="xla")

    @classmethod
    def for_forward(
        cls,
        attention_mask: Array,
        implementation: str,
        window: int | None = None,
        mixed: bool = False,
    ) -> tuple[AttentionMask, Array]:
        """The mask of a plain forward and a per-row flag ``[B]``: False where the lengths form
        cannot represent ``attention_mask`` (left / inner padding), whose outputs the caller
        poisons with NaN rather than return silently wrong numbers. ``window``: the sliding
        window of every layer, or (``mixed``) of the layers flagged sliding."""
        m = attention_mask.astype(bool)
        b, t = m.shape
        if not _use_lengths(implementation):
            if mixed:
                return cls(dense=forward_mask(m), dense_local=forward_mask(m, window)), jnp.ones((b,), bool)
            return cls(dense=forward_mask(m, window)), jnp.ones((b,), bool)
        if mixed:  # attention_implementation never picks cuDNN for these
            raise ConfigError("per-layer sliding windows need model.attention=xla")
        lengths = jnp.sum(m, axis=1, dtype=jnp.int32)
        right_padded = jnp.all(m == (jnp.arange(t)[None, :] < lengths[:, None]), axis=1)
        # A fully padded row (batch filler) keeps one key, so it stays finite like the dense
        # form's "each query sees itself"; its outputs are never read.
        lengths = jnp.maximum(lengths, 1)
        return cls(kv_lengths=lengths, window=window, implementation=implementation), right_padded

    @classmethod
    def for_decode(
        cls, kv_mask: Array, cache_index: Array, t: int, window: int | None = None, mixed: bool = False
    ) -> AttentionMask:
        """Decode's dense mask (left-padded prompts, cache slots: the XLA path), windowed like
        :meth:`for_forward`."""
        if mixed:
            return cls(
                dense=decode_mask(kv_mask, cache_index, t),
                dense_local=decode_mask(kv_mask, cache_index, t, window),
            )
        return cls(dense=decode_mask(kv_mask, cache_index, t, window))

    def for_layer(self, sliding: Array | bool) -> AttentionMask:
        """The mask of one layer: windowed where ``sliding`` (only differs with per-layer windows)."""
        if self.dense_local is None:
            return self
        return AttentionMask(dense=jnp.where(sliding, self.dense_local, self.dense))


def softcapped_attention(q: Array, k: Array, v: Array, mask: Array, scale: float, softcap: float) -> Array:
    """``softmax(cap · tanh(q kᵀ · scale / cap) + mask) v`` (Gemma 2, arXiv 2408.00118 §2; HF's
    ``eager_attention_forward``: cap, then mask, float32 softmax), grouped-query heads shared as
    in :func:`jax.nn.dot_product_attention`. ``q [B, T, N, H]``, ``k, v [B, S, K, H]``."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.tanh(scores / softcap) * softcap
    big_neg = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask[:, :, None], scores, big_neg)  # mask [B, 1, T, S] -> [B, 1, 1, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def attend(
    q: Array, k: Array, v: Array, mask: AttentionMask | Array, scale: float, softcap: float | None = None
) -> Array:
    """``softmax(q kᵀ · scale + mask) v`` for ``q [B, T, N, H]``, ``k, v [B, S, K, H]``
    (``softcap``: the scores soft-capped before the mask, on the dense path only)."""
    if isinstance(mask, AttentionMask) and mask.kv_lengths is not None:
        if softcap is not None:  # attention_implementation never picks cuDNN for these
            raise ConfigError("attention logit soft-capping needs model.attention=xla")
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=scale,
            is_causal=True,
            key_value_seq_lengths=mask.kv_lengths,
            # HF keeps keys with q - k < window: jax's left window is window - 1.
            local_window_size=None if mask.window is None else (mask.window - 1, 0),
            implementation=mask.implementation,
        )
    dense = mask.dense if isinstance(mask, AttentionMask) else mask
    if softcap is not None:
        return softcapped_attention(q, k, v, dense, scale, softcap)
    return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, implementation="xla")
