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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax.errors import ConfigError, ModelLoadError

# layers' public names, moved to their own modules (issue 14); ``layers.X`` keeps working.
from sga_jax.models.attention import (  # noqa: F401
    ATTENTION_IMPLEMENTATIONS,
    AttentionMask,
    attend,
    attention_implementation,
    decode_mask,
    forward_mask,
    softcapped_attention,
    write_cache,
)
from sga_jax.models.rope import LayerRope, RopeConfig, apply_rope  # noqa: F401

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


# ------------------------------------------------------------------- attention (the module)
# Masks and kernels: sga_jax.models.attention; RoPE: sga_jax.models.rope.


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
            k_all, v_all = write_cache(kv["k"], k, cache_index), write_cache(kv["v"], v, cache_index)
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
    if isinstance(rope, LayerRope):  # Gemma 3: a RoPE base per layer type
        rope = rope.for_layer(sliding)
    return layer(x, rope, mask.for_layer(sliding), kv, cache_index)


def _tapped(layers: nnx.Module) -> bool:
    """Whether a Linear of ``layers`` has its K-FAC hooks on (they write variables in the forward)."""
    return any(isinstance(n, Linear) and n.kfac_tap for _, n in nnx.iter_graph(layers))


def _scan_layers(layers, x, rope, mask, cache, cache_index, sliding, use_remat: bool, policy, span=None):
    """The stacked layers as a ``jax.lax.scan`` over their state, a plain pytree, rebuilt into a
    layer in each step. ``nnx.scan`` over the module would also return every layer's variables as
    a stacked scan output: one more copy of all layer weights per step (≈ 26 GiB of float32 temporaries
    for Llama-3.1-8B, docs/performance.md "LoRA memory"). A forward writes no variable here (the
    K-FAC taps, which do, keep ``nnx.scan``), so nothing needs carrying out. ``span = (lo, hi)``:
    layers ``lo .. hi-1`` only (a slice of the stacked axis; :meth:`DecoderLM.layer_outputs`)."""
    graphdef, state = nnx.split(layers)
    if span is not None:
        lo, hi = span
        state = jax.tree.map(lambda a: a[lo:hi], state)
        sliding = sliding[lo:hi]

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
    def _forward_inputs(self, input_ids: Array, attention_mask: Array | None):
        """``(x, rope, mask, representable)``: the embedded tokens and what every layer takes."""
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
        return x, self._rope(positions), mask, representable

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Final hidden states ``[B, T, d]`` (after the final norm; OPT: after project_out)."""
        x, rope, mask, representable = self._forward_inputs(input_ids, attention_mask)
        x, _ = self._run_layers(x, rope, mask, None, None)
        # The lengths form is exact only for right padding (training and scoring batches); a left-
        # or inner-padded row under it gives NaN, loudly, instead of wrong logits.
        return jnp.where(representable[:, None, None], self._final(x), jnp.nan)

    def layer_outputs(
        self, input_ids: Array, attention_mask: Array | None = None, *, layers: tuple[int, ...]
    ) -> dict[int, Array]:
        """``{l: [B, T, d]}``: the output of decoder layer ``l`` (0-based) for each ``l`` of
        ``layers``, the residual stream after that layer, before any final norm: what a forward hook
        on HF's ``model.layers[l]`` sees as ``output[0]`` (open-unlearning rmu.py l. 83-98). Only the
        layers up to ``max(layers)`` run, and the result is the same unrolled and under
        ``scan_layers`` (the scanned stack runs as slices of its stacked axis, so nothing beyond the
        asked layers is kept; flax's ``sow`` under ``nnx.scan`` would stack one per layer)."""
        n = self.config.num_layers
        want = sorted({int(i) for i in layers})
        if not want or want[0] < 0 or want[-1] >= n:
            raise ConfigError(
                f"layer index {list(layers)} out of range: the model has {n} layers (0..{n - 1})"
            )
        if _tapped(self.layers):
            raise ConfigError("layer_outputs does not run with K-FAC taps on")
        x, rope, mask, representable = self._forward_inputs(input_ids, attention_mask)
        out, lo = {}, 0
        for hi in want:
            x = self._run_span(x, rope, mask, lo, hi + 1)
            out[hi] = jnp.where(representable[:, None, None], x, jnp.nan)
            lo = hi + 1
        return out

    def _run_span(self, x, rope, mask, lo: int, hi: int) -> Array:
        """Decoder layers ``lo .. hi-1`` on ``x`` (no KV cache), unrolled or as a scan over the slice."""
        use_remat, policy = remat_policy(self.remat, self.scan_layers)
        _, flags = self._windows()
        sliding = np.zeros(self.config.num_layers, bool) if flags is None else flags
        if self.scan_layers:
            x, _ = _scan_layers(self.layers, x, rope, mask, None, None, sliding, use_remat, policy, (lo, hi))
            return x
        body = nnx.remat(_layer_body, policy=policy) if use_remat else _layer_body
        for i in range(lo, hi):
            x, _ = body(x, self.layers[i], rope, mask, None, None, bool(sliding[i]))
        return x

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
