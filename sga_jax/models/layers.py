"""Building blocks shared by the Llama, OPT and Phi ports (Flax NNX).

Conventions (the same in every architecture):

* dense kernels are ``[in, out]`` (HF stores ``[out, in]``: the loaders transpose);
* ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; norms, softmax and RoPE are
  computed in float32 and cast back, as HF does;
* attention goes through :func:`jax.nn.dot_product_attention`, chosen by ``attention``
  (:func:`attention_implementation`): ``xla`` (float32 softmax, a boolean mask ``[B, 1, T, S]``;
  what ``implementation=None`` runs in JAX 0.10 / 0.11, on every backend) or ``cudnn`` (cuDNN flash
  attention on a CUDA GPU: causal + per-row key lengths, no dense mask; only for right-padded
  forwards — KV-cache decode keeps the dense-mask XLA path). ``auto`` picks cuDNN where supported;
* a layer receives its mask as an :class:`AttentionMask` (either form), so the decoder layers of
  every architecture are the same for both paths;
* a decoder layer is called as ``layer(x, rope, mask, kv, cache_index) -> (x, kv)`` so that the
  stack can be run unrolled or scanned (``scan_layers``: :func:`jax.lax.scan` over the stacked
  layer state, :func:`flax.nnx.scan` while K-FAC taps write variables) and under remat, with or
  without a KV cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sga_jax.errors import ConfigError, ModelLoadError

Array = jax.Array
Dtype = Any

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def expand_to(v: Array, ndim: int) -> Array:
    """``v`` with leading axes of size 1 up to ``ndim`` axes: an explicit broadcast of a vector
    (bias, scale, frequencies) against ``[..., d]`` (the tests run with rank promotion raising)."""
    return jnp.reshape(v, (1,) * (ndim - jnp.ndim(v)) + jnp.shape(v))


def as_dtype(dtype: Any) -> Any:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``np.dtype`` -> a JAX dtype (ConfigError when unknown)."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type


def _normal(std: float = 0.02) -> Callable[..., Array]:
    return jax.nn.initializers.normal(stddev=std)


# ------------------------------------------------------------------------------------------ dense


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel [in, out]``.

    K-FAC hooks (docs/interfaces.md): when ``self.kfac_tap`` is True the layer sows its input as
    ``nnx.Intermediate("kfac_in")`` and routes its output through ``self.perturb("kfac_out", y)``,
    so that the gradient w.r.t. the perturbation is the gradient w.r.t. the layer output
    (Martens & Grosse 2015, arXiv 1503.05671, eq. 1: A = E[a aᵀ], G = E[g gᵀ]).
    Off by default: normal runs pay nothing.

    ``lora``: LoRA adapters attached by :func:`sga_jax.models.lora.apply_lora` (None otherwise),
    whose output ``(alpha / r) · B A x`` is added to ``x @ kernel``.
    """

    lora: Any = None  # a class default: a plain Linear's state holds no adapter node

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kfac_tap = False
        self.kernel = nnx.Param(_normal()(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: Array, *, out_dtype: Dtype | None = None) -> Array:
        x = x.astype(self.dtype)
        if self.kfac_tap:
            self.sow(nnx.Intermediate, "kfac_in", x)
        # As a 2-D product: the weight gradient then contracts one dimension, not (batch, seq),
        # which XLA:CPU runs ~2x faster (benchmarks/step_vs_torch.py).
        lead = x.shape[:-1]
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel, preferred_element_type=out_dtype)
        y = y.reshape(*lead, y.shape[-1])
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        if self.bias is not None:
            y = y + expand_to(self.bias[...].astype(y.dtype), y.ndim)
        if self.kfac_tap:
            y = self.perturb("kfac_out", y)
        return y


class Embed(nnx.Module):
    """Token (or learned position) embedding table ``[num, features]``."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = nnx.Param(_normal()(rngs.params(), (num_embeddings, features), param_dtype))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


# ------------------------------------------------------------------------------------------ norms


class RMSNorm(nnx.Module):
    """``y = scale * x / sqrt(mean(x²) + eps)`` in float32 (Zhang & Sennrich 2019, arXiv 1910.07467)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the compute dtype before multiplying by the weight.
        return expand_to(self.scale[...].astype(self.dtype), y.ndim) * y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """``y = (x - mean) / sqrt(var + eps) * scale + bias`` in float32 (arXiv 1607.06450)."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * expand_to(self.scale[...].astype(jnp.float32), y.ndim)
        if self.bias is not None:
            y = y + expand_to(self.bias[...].astype(jnp.float32), y.ndim)
        return y.astype(self.dtype)


# ----------------------------------------------------------------------------------- activations


def gelu_new(x: Array) -> Array:
    """GPT-2's tanh approximation: ``0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))``."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu_fast": gelu_new,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ------------------------------------------------------------------------------------------- RoPE


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
        freqs = pos[..., None] * expand_to(inv, pos.ndim + 1)
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


# ------------------------------------------------------------------------------------- attention


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
    (with a ``window``: only the last ``window`` slots up to each query's own)."""
    s = kv_mask.shape[1]
    slots = jnp.arange(s)
    query_slot = cache_index + jnp.arange(t)
    causal = (slots[None, :] <= query_slot[:, None]) & _in_window(query_slot, slots, window)
    own = slots[None, :] == query_slot[:, None]
    return (causal[None, None] & kv_mask.astype(bool)[:, None, None, :]) | own[None, None]


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


def softcap_logits(z: Array, cap: float | None) -> Array:
    """``cap · tanh(z / cap)`` (Gemma 2's final logit soft-capping); ``z`` unchanged without a cap."""
    return z if cap is None else jnp.tanh(z / cap) * cap


class Attention(nnx.Module):
    """Multi-head / grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245).

    ``softmax(q kᵀ / √head_dim + mask) v`` with q, k rotated by RoPE (first ``rope.dim`` channels);
    K/V heads are shared by ``num_heads / num_kv_heads`` query heads. Optional per-head LayerNorm on
    q and k (Phi's ``qk_layernorm``), ``scale`` in place of ``1/√head_dim`` (Gemma 2's
    ``query_pre_attn_scalar``) and score soft-capping (Gemma 2's ``attn_logit_softcapping``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        out_bias: bool,
        qk_norm_eps: float | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = head_dim**-0.5 if scale is None else scale
        self.softcap = softcap
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(hidden_size, num_heads * head_dim, use_bias=qkv_bias, **kw)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias, **kw)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias, **kw)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, use_bias=out_bias, **kw)
        if qk_norm_eps is not None:
            norm = dict(eps=qk_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.q_norm = LayerNorm(head_dim, **norm)
            self.k_norm = LayerNorm(head_dim, **norm)
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self,
        x: Array,
        rope: tuple[Array, Array] | None,
        mask: AttentionMask | Array,
        kv: dict[str, Array] | None = None,
        cache_index: Array | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            start = (0, cache_index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start)
            v_all = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start)
            kv = {"k": k_all, "v": v_all}
            k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)
        out = attend(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), kv


# ------------------------------------------------------------------------------ decoder plumbing

# model.remat: how much of a decoder layer's forward is kept for the backward pass. Names follow
# MaxText's ``remat_policy`` where they overlap (``full``, ``minimal``).
REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # MaxText's "minimal"
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}
# What ``remat=None`` / ``"auto"`` means under scan_layers (unrolled: no remat). Measured in
# docs/performance.md ("Scan over layers and remat"): scan without remat keeps every layer's
# intermediates stacked [L, ...] and needs more memory than the unrolled stack (the H100 OOM of
# issue 12); saving only the layer inputs (the scan carry) and recomputing the rest is the
# smallest, at about one extra forward.
DEFAULT_SCAN_REMAT = "full"
REMAT_CHOICES = ("auto", "none", *REMAT_POLICIES)


def remat_policy(name: str | None, scan_layers: bool = False) -> tuple[bool, Any]:
    """``model.remat`` -> ``(use_remat, policy)``.

    ``None`` / ``"auto"``: ``DEFAULT_SCAN_REMAT`` under ``scan_layers``, no remat unrolled;
    ``"none"``: no remat; a name of ``REMAT_POLICIES`` or of ``jax.checkpoint_policies``.
    """
    if name is None or name == "auto":
        if not scan_layers:
            return False, None
        name = DEFAULT_SCAN_REMAT
    if name == "none":
        return False, None
    if name in REMAT_POLICIES:
        return True, REMAT_POLICIES[name]
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or not callable(policy) or name.startswith("_"):
        raise ConfigError(
            f"unknown remat policy {name!r}; use null, one of {', '.join(REMAT_CHOICES)} "
            "or a name in jax.checkpoint_policies"
        )
    return True, policy


def make_layers(create: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, scan: bool):
    """``n`` decoder layers: an ``nnx.List`` or (scan) one module whose params are stacked ``[n, ...]``."""
    if not scan:
        return nnx.List([create(rngs) for _ in range(n)])

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(r: nnx.Rngs) -> nnx.Module:
        return create(r)

    return stacked(rngs)


def _layer_body(x, layer, rope, mask, kv, cache_index, sliding):
    return layer(x, rope, mask.for_layer(sliding), kv, cache_index)


def _tapped(layers: nnx.Module) -> bool:
    """Whether a Linear of ``layers`` has its K-FAC hooks on (they write variables in the forward)."""
    return any(isinstance(n, Linear) and n.kfac_tap for _, n in nnx.iter_graph(layers))


def _scan_layers(layers, x, rope, mask, cache, cache_index, sliding, use_remat: bool, policy):
    """The stacked layers as a ``jax.lax.scan`` over their state, a plain pytree, rebuilt into a
    layer in each step. ``nnx.scan`` over the module would also return every layer's variables as
    a stacked scan output: one more copy of all layer weights per step (≈ 26 GiB of float32 temporaries
    for Llama-3.1-8B, docs/performance.md "LoRA memory"). A forward writes no variable here (the
    K-FAC taps, which do, keep ``nnx.scan``), so nothing needs carrying out."""
    graphdef, state = nnx.split(layers)

    def body(x, st, kv, sl):
        return _layer_body(x, nnx.merge(graphdef, st), rope, mask, kv, cache_index, sl)

    if use_remat:  # as nnx.remat(prevent_cse=False) under scan
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)

    def step(x, xs):
        return body(x, *xs)

    return jax.lax.scan(step, x, (state, cache, jnp.asarray(sliding)))


class DecoderLM(nnx.Module):
    """Shared causal-LM plumbing: forward, hidden states, KV-cache decode, scan / remat.

    Subclasses set ``config``, ``layers``, ``dtype``, ``scan_layers``, ``remat``, ``attention``
    (``auto`` | ``xla`` | ``cudnn``, see :func:`attention_implementation`) and implement
    ``_embed(input_ids, positions)``, ``_rope(positions)``, ``_final(x)``, ``_positions(mask)``
    and ``lm_head_weights()``; they may override ``_logits(h)``. Optional config fields:
    ``sliding_window`` (int or None) with ``sliding_layers`` (per-layer flags; None: every layer),
    ``attn_logit_softcapping`` and ``final_logit_softcapping`` (Gemma 2).
    """

    config: Any
    layers: Any
    dtype: Any
    scan_layers: bool
    remat: str | None
    attention: str = "auto"

    def _setup(
        self, config: Any, dtype: Any, param_dtype: Any, scan_layers: bool, remat: str | None, attention: str
    ) -> tuple[Any, Any]:
        """The start of every port's ``__init__``: store the settings, validate ``remat`` and the
        attention implementation early; returns ``(dtype, param_dtype)`` (param_dtype None: dtype)."""
        dtype = as_dtype(dtype)
        param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
        remat_policy(remat, scan_layers)  # validate early
        self.config = config
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat = remat
        self.attention = attention
        self.attention_impl()  # validate early (windows / soft-capping rule cuDNN out)
        return dtype, param_dtype

    # --- hooks -------------------------------------------------------------------------------
    def _embed(self, input_ids: Array, positions: Array) -> Array:
        raise NotImplementedError

    def _rope(self, positions: Array) -> tuple[Array, Array] | None:
        return None

    def _final(self, x: Array) -> Array:
        raise NotImplementedError

    def _positions(self, attention_mask: Array) -> Array:
        """Positions of a plain forward (Llama / Phi: ``arange``, as HF without ``position_ids``)."""
        b, t = attention_mask.shape
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

    def lm_head_weights(self) -> tuple[Array, Array | None]:
        raise NotImplementedError

    @property
    def logit_softcap(self) -> float | None:
        """Final logit soft-cap ``z -> cap · tanh(z / cap)`` (Gemma 2), applied by ``_logits`` and
        by every log-prob path from ``hidden_states`` + ``lm_head_weights`` (sga_jax.logprobs)."""
        return getattr(self.config, "final_logit_softcapping", None)

    def _logits(self, h: Array) -> Array:
        w, b = self.lm_head_weights()
        logits = jnp.dot(h, w.astype(self.dtype), preferred_element_type=jnp.float32)
        if b is not None:
            logits = logits + expand_to(b.astype(jnp.float32), logits.ndim)
        return softcap_logits(logits, self.logit_softcap)

    # --- sliding windows ---------------------------------------------------------------------
    def _windows(self) -> tuple[int | None, np.ndarray | None]:
        """``(window, per-layer flags)``: flags only when some layers slide and others do not."""
        window = getattr(self.config, "sliding_window", None)
        flags = getattr(self.config, "sliding_layers", None)
        if window is None or (flags is not None and not any(flags)):
            return None, None
        if flags is None or all(flags):
            return int(window), None
        return int(window), np.asarray(flags, bool)

    # --- stack -------------------------------------------------------------------------------
    def _run_layers(self, x, rope, mask, cache, cache_index):
        use_remat, policy = remat_policy(self.remat, self.scan_layers)
        body = _layer_body
        if use_remat:
            body = nnx.remat(body, policy=policy, prevent_cse=not self.scan_layers)
        _, flags = self._windows()
        sliding = np.zeros(self.config.num_layers, bool) if flags is None else flags
        if self.scan_layers and not _tapped(self.layers):
            return _scan_layers(self.layers, x, rope, mask, cache, cache_index, sliding, use_remat, policy)
        if self.scan_layers:
            # K-FAC taps sow / perturb inside the layers: nnx.scan carries those variables out.
            scan = nnx.scan(body, in_axes=(nnx.Carry, 0, None, None, 0, None, 0), out_axes=(nnx.Carry, 0))
            return scan(x, self.layers, rope, mask, cache, cache_index, jnp.asarray(sliding))
        new_cache = []
        for i, layer in enumerate(self.layers):
            kv_i = None if cache is None else cache[i]
            x, kv = body(x, layer, rope, mask, kv_i, cache_index, bool(sliding[i]))
            new_cache.append(kv)
        return x, (None if cache is None else new_cache)

    def attention_impl(self) -> str:
        """The attention implementation this model runs here (``"xla"`` or ``"cudnn"``)."""
        return attention_implementation(
            self.attention,
            self.dtype,
            self.config.head_dim,
            softcap=getattr(self.config, "attn_logit_softcapping", None) is not None,
            mixed_windows=self._windows()[1] is not None,
        )

    # --- public API (docs/interfaces.md) -----------------------------------------------------
    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Final hidden states ``[B, T, d]`` (after the final norm; OPT: after project_out)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(attention_mask)
        positions = self._positions(attention_mask)
        x = self._embed(input_ids, positions)
        window, flags = self._windows()
        mask, representable = AttentionMask.for_forward(
            attention_mask, self.attention_impl(), window, mixed=flags is not None
        )
        x, _ = self._run_layers(x, self._rope(positions), mask, None, None)
        # The lengths form is exact only for right padding (training and scoring batches); a left-
        # or inner-padded row under it gives NaN, loudly, instead of wrong logits.
        return jnp.where(representable[:, None, None], self._final(x), jnp.nan)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Logits ``[B, T, V]`` float32."""
        return self._logits(self.hidden_states(input_ids, attention_mask))

    def init_cache(self, batch_size: int, max_length: int) -> Any:
        """Zeroed K/V cache: per layer ``{"k", "v"}: [B, S, n_kv_heads, head_dim]`` (stacked
        ``[L, ...]`` when ``scan_layers``)."""
        c = self.config
        shape = (batch_size, max_length, c.num_key_value_heads, c.head_dim)
        if self.scan_layers:
            shape = (c.num_layers, *shape)
            return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
        return [
            {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
            for _ in range(c.num_layers)
        ]

    def decode(
        self,
        input_ids: Array,
        positions: Array,
        cache: Any,
        cache_index: Array | int,
        kv_mask: Array,
    ) -> tuple[Array, Any]:
        """Run ``t`` new tokens against the cache: writes their K/V at slots
        ``[cache_index, cache_index + t)`` and attends causally to the slots where ``kv_mask`` is
        true. ``positions`` are logical (0 = first real token). Returns ``(logits [B, t, V], cache)``."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        cache_index = jnp.asarray(cache_index, jnp.int32)
        x = self._embed(input_ids, positions)
        # Decode keeps the dense mask (left-padded prompts, cache slots): the XLA path.
        window, flags = self._windows()
        mask = AttentionMask.for_decode(
            jnp.asarray(kv_mask), cache_index, input_ids.shape[1], window, mixed=flags is not None
        )
        x, cache = self._run_layers(x, self._rope(positions), mask, cache, cache_index)
        return self._logits(self._final(x)), cache
