"""Per-token log-probabilities of the labels over a large vocabulary, without the [N, V] logits.

``logp[n] = z[n, y_n] - logsumexp_v z[n, v]`` with ``z = h @ W + b``. The plain computation
materialises the float32 logits ``[N, V]`` (and, under ``jax.grad``, the softmax of the same
size): 4.2 GB for N = 8,192 tokens and Llama-3's V = 128,256. The ``chunked`` path streams the
vocabulary in chunks of ``chunk_size`` columns with an online logsumexp (Milakov & Gimelshein 2018,
arXiv 1805.02867) and a ``jax.custom_vjp`` whose backward pass recomputes each chunk's logits from
``h`` and ``W`` instead of storing them (the "cut cross-entropy" idea, Wijmans et al. 2024,
arXiv 2411.09009). Peak memory is then O(N·chunk_size) instead of O(N·V).

With ``softcap`` the logits are soft-capped first, ``z -> cap · tanh(z / cap)`` (Gemma 2's final
logit soft-capping, HF ``Gemma2ForCausalLM.forward``); the chunked backward pass multiplies by
``1 - tanh²(z / cap)``.

Rows whose label is negative (e.g. ``-100`` or ``-1`` for prompt / padding tokens) are ignored:
their log-prob is 0 and they contribute nothing to any gradient.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from sga_jax.errors import ConfigError

Implementation = Literal["reference", "chunked"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "chunked")
DEFAULT_CHUNK_SIZE = 8192


def _check(hidden: jax.Array, weight: jax.Array, labels: jax.Array, bias: jax.Array | None) -> None:
    if hidden.ndim != 2 or weight.ndim != 2 or labels.ndim != 1:
        raise ConfigError(
            "token_logprobs expects hidden [N, d], weight [d, V], labels [N]; got shapes "
            f"{hidden.shape}, {weight.shape}, {labels.shape}"
        )
    if hidden.shape[1] != weight.shape[0] or hidden.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"token_logprobs: hidden {hidden.shape}, weight {weight.shape} and labels {labels.shape} "
            "do not fit together (hidden [N, d] @ weight [d, V], labels [N])"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ConfigError(f"token_logprobs: labels must be integers, got {labels.dtype}")
    if bias is not None and bias.shape != (weight.shape[1],):
        raise ConfigError(f"token_logprobs: bias must have shape ({weight.shape[1]},), got {bias.shape}")


def _logits(h: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    # Inputs stay in their own dtype (bf16 on accelerators); products accumulate in float32.
    z = jnp.dot(h, w, preferred_element_type=jnp.float32)
    if b is not None:
        z = z + b.astype(jnp.float32)[None, :]  # explicit: z is [N, V]
    return z


def reference_token_logprobs(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Plain JAX: full float32 logits, ``log_softmax``, gather. The ground truth for the kernels."""
    z = _logits(hidden, weight.astype(hidden.dtype), None if bias is None else bias)
    if softcap is not None:
        z = jnp.tanh(z / softcap) * softcap
    logp = jax.nn.log_softmax(z, axis=-1)
    valid = labels >= 0
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[:, None].astype(jnp.int32), axis=1)[:, 0]
    return jnp.where(valid, picked, 0.0)


# ---------------------------------------------------------------------------------------- chunked


def _split_vocab(weight: jax.Array, bias: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, int]:
    """``W [d, V]`` -> ``[n, d, chunk]`` (zero-padded to a multiple of ``chunk``), bias likewise."""
    d, v = weight.shape
    n = -(-v // chunk)
    pad = n * chunk - v
    if pad:
        weight = jnp.pad(weight, ((0, 0), (0, pad)))
        bias = jnp.pad(bias, (0, pad))
    return weight.reshape(d, n, chunk).transpose(1, 0, 2), bias.reshape(n, chunk), v


def _chunk_logits(h, w_c, b_c, start, vocab, softcap=None):
    """Logits of one vocabulary chunk (soft-capped), columns past the real vocabulary set to -inf
    (after the cap: tanh would make -inf finite); also d(capped)/d(raw) (1 without a cap)."""
    z = _logits(h, w_c, b_c)
    slope = 1.0
    if softcap is not None:
        t = jnp.tanh(z / softcap)
        z, slope = t * softcap, 1.0 - t * t
    cols = start + jnp.arange(w_c.shape[1])
    return jnp.where(cols[None, :] < vocab, z, -jnp.inf), cols, slope


def _forward(hidden, weight, labels, bias, chunk, softcap):
    w_chunks, b_chunks, vocab = _split_vocab(weight, bias, chunk)
    n_tok = hidden.shape[0]
    starts = jnp.arange(w_chunks.shape[0]) * chunk

    def body(carry, xs):
        m, s, picked = carry
        w_c, b_c, start = xs
        z, _, _ = _chunk_logits(hidden, w_c, b_c, start, vocab, softcap)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        local = labels - start
        inside = (local >= 0) & (local < chunk)
        z_y = jnp.take_along_axis(z, jnp.clip(local, 0, chunk - 1)[:, None], axis=1)[:, 0]
        picked = jnp.where(inside, z_y, picked)
        return (m_new, s, picked), None

    init = (
        jnp.full((n_tok,), -jnp.inf, jnp.float32),
        jnp.zeros((n_tok,), jnp.float32),
        jnp.zeros((n_tok,), jnp.float32),
    )
    (m, s, picked), _ = jax.lax.scan(body, init, (w_chunks, b_chunks, starts))
    lse = m + jnp.log(s)
    valid = labels >= 0
    return jnp.where(valid, picked - lse, 0.0), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(hidden, weight, labels, bias, chunk, softcap):
    return _forward(hidden, weight, labels, bias, chunk, softcap)[0]


def _chunked_fwd(hidden, weight, labels, bias, chunk, softcap):
    logp, lse = _forward(hidden, weight, labels, bias, chunk, softcap)
    # Residuals are O(N·d + d·V): the logits are recomputed in the backward pass.
    return logp, (hidden, weight, labels, bias, lse)


def _chunked_bwd(chunk, softcap, res, g):
    hidden, weight, labels, bias, lse = res
    w_chunks, b_chunks, vocab = _split_vocab(weight, bias, chunk)
    starts = jnp.arange(w_chunks.shape[0]) * chunk
    # d logp_n / d z_nv = onehot(y_n)_v - softmax(z_n)_v; ignored rows get no gradient.
    g = jnp.where(labels >= 0, g.astype(jnp.float32), 0.0)

    def body(dh, xs):
        w_c, b_c, start = xs
        z, cols, slope = _chunk_logits(hidden, w_c, b_c, start, vocab, softcap)
        p = jnp.exp(z - lse[:, None])  # 0 on the padded columns (exp(-inf))
        onehot = (cols[None, :] == labels[:, None]).astype(jnp.float32)
        dz = g[:, None] * (onehot - p) * slope  # through the cap to the raw logits
        dz_c = dz.astype(hidden.dtype)
        dh = dh + jnp.dot(dz_c, w_c.T, preferred_element_type=jnp.float32)
        dw_c = jnp.dot(hidden.T, dz_c, preferred_element_type=jnp.float32)
        return dh, (dw_c.astype(weight.dtype), jnp.sum(dz, axis=0).astype(bias.dtype))

    dh0 = jnp.zeros(hidden.shape, jnp.float32)
    dh, (dw, db) = jax.lax.scan(body, dh0, (w_chunks, b_chunks, starts))
    d = weight.shape[0]
    dw = dw.transpose(1, 0, 2).reshape(d, -1)[:, :vocab]
    db = db.reshape(-1)[:vocab]
    return dh.astype(hidden.dtype), dw, None, db


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_token_logprobs(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    token_chunk_size: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Vocabulary-chunked log-probs with a recomputing ``custom_vjp``.

    ``chunk_size`` columns of the vocabulary are live at a time; ``token_chunk_size`` (optional)
    also splits the tokens into blocks processed one after another (``lax.map``), so the live
    logits are ``[token_chunk_size, chunk_size]``.
    """
    if chunk_size < 1 or (token_chunk_size is not None and token_chunk_size < 1):
        raise ConfigError(f"chunk sizes must be >= 1, got {chunk_size} and {token_chunk_size}")
    weight = weight.astype(hidden.dtype)
    # A zero bias keeps one code path; its gradient is simply dropped when the caller gave none.
    b = jnp.zeros((weight.shape[1],), jnp.float32) if bias is None else bias
    labels = labels.astype(jnp.int32)
    chunk = min(chunk_size, weight.shape[1])
    n = hidden.shape[0]
    if token_chunk_size is None or token_chunk_size >= n:
        return _chunked(hidden, weight, labels, b, chunk, softcap)
    blocks = -(-n // token_chunk_size)
    pad = blocks * token_chunk_size - n
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(blocks, token_chunk_size, -1)
    y = jnp.pad(labels, (0, pad), constant_values=-1).reshape(blocks, token_chunk_size)
    out = jax.lax.map(lambda xs: _chunked(xs[0], weight, xs[1], b, chunk, softcap), (h, y))
    return out.reshape(-1)[:n]


def token_logprobs(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None = None,
    *,
    implementation: Implementation = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    token_chunk_size: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """``log p(labels[n] | hidden[n])`` under the LM head ``softmax(hidden @ weight + bias)``
    (``softmax(cap · tanh((hidden @ weight + bias) / cap))`` with ``softcap``).

    Args:
      hidden: ``[N, d]`` final hidden states (after the final norm), any float dtype.
      weight: ``[d, V]`` LM-head weight (tied models: the embedding transposed); cast to
        ``hidden.dtype``.
      labels: ``[N]`` int target ids; negative ids mark ignored rows (log-prob 0, no gradient).
      bias: optional ``[V]`` LM-head bias (OPT / Phi have one).
      implementation: ``"reference"`` (full logits) or ``"chunked"`` (O(N·chunk_size) memory).
      chunk_size: vocabulary columns per chunk (``chunked`` only); V need not be a multiple.
      token_chunk_size: optional token block size (``chunked`` only).
      softcap: optional final logit soft-cap (Gemma 2's ``final_logit_softcapping``); ``None``: none.

    Returns:
      ``[N]`` float32 log-probabilities, differentiable w.r.t. ``hidden``, ``weight``, ``bias``.
    """
    _check(hidden, weight, labels, bias)
    if softcap is not None and not softcap > 0:
        raise ConfigError(f"token_logprobs: softcap must be > 0 or None, got {softcap}")
    if implementation == "reference":
        return reference_token_logprobs(hidden, weight, labels, bias, softcap)
    if implementation == "chunked":
        return chunked_token_logprobs(
            hidden,
            weight,
            labels,
            bias,
            chunk_size=chunk_size,
            token_chunk_size=token_chunk_size,
            softcap=softcap,
        )
    raise ConfigError(
        f"unknown log-prob implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}"
    )
