"""How far a model moves in *output space*: the per-token KL between two models' next-token
distributions, and its second-order model along a parameter direction (the Gauss-Newton quadratic).

For softmax outputs ``p = softmax(z)`` the KL of a small logit change ``ż`` is, per token,

    KL(p_z ‖ p_{z+ηż}) = ½ η² żᵀ(diag(p) − ppᵀ)ż + O(η³) = ½ η² [Σ_v p_v ż_v² − (Σ_v p_v ż_v)²] + O(η³)

and with ``ż = J d`` (one ``jax.jvp`` of the logits along the parameter direction ``d``) the bracket
is ``dᵀ(Jᵀ H J)d``, the exact Gauss-Newton (= Fisher) quadratic of the outputs (Martens 2020, "New
insights and perspectives on the natural gradient method", JMLR 21, §9.2; its use to rescale a
K-FAC step: Martens & Grosse 2015, arXiv 1503.05671, §6.4). Every figure here is a mean over the
*answer* tokens of a batch (the ``loss_mask`` targets, :func:`sga_jax.logprobs.targets`): "KL per
answer token".

The logits are computed ``chunk_rows`` rows at a time (``lax.map``), so a ``[B, T, V]`` float32
tensor is never held for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.logprobs import targets

Array = jax.Array
Batch = Mapping[str, Array]


def kl_sums(p_logits: Array, q_logits: Array, mask: Array) -> tuple[Array, Array]:
    """``(Σ_t m_t KL(p_t ‖ q_t), Σ_t m_t)`` for logits ``[..., V]`` and a mask ``[...]`` (float32)."""
    lp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(kl * m), jnp.sum(m)


def gauss_newton_sums(logits: Array, tangent: Array, mask: Array) -> tuple[Array, Array]:
    """``(Σ_t m_t żᵀ(diag(p) − ppᵀ)ż, Σ_t m_t)``: the softmax Gauss-Newton quadratic of the logit
    tangent ``ż`` (float32)."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    t = tangent.astype(jnp.float32)
    pt = jnp.sum(p * t, axis=-1)
    quad = jnp.sum(p * t * t, axis=-1) - pt * pt
    m = mask.astype(jnp.float32)
    return jnp.sum(quad * m), jnp.sum(m)


def _chunks(batch: Batch, chunk_rows: int) -> tuple[dict[str, Array], int]:
    """``batch`` reshaped to ``[n, c, T]`` with ``c`` the largest divisor of B that is <= chunk_rows."""
    b = int(jnp.shape(batch["input_ids"])[0])
    c = max(d for d in range(1, min(b, max(int(chunk_rows), 1)) + 1) if b % d == 0)
    keys = ("input_ids", "attention_mask", "loss_mask")
    return {k: jnp.asarray(batch[k]).reshape(b // c, c, -1) for k in keys}, c


def _logits(model: Any, b: Batch) -> tuple[Array, Array]:
    """Logits at the predicting positions ``[c, T-1, V]`` and the answer-token mask ``[c, T-1]``."""
    _, mask = targets(b)
    return model(b["input_ids"], b["attention_mask"])[:, :-1], mask


def gauss_newton_quadratic(
    graphdef: nnx.GraphDef, params: Any, rest: Any, direction: Any, batch: Batch, *, chunk_rows: int = 4
) -> Array:
    """``dᵀ G d`` per answer token of ``batch``: G the exact Gauss-Newton matrix of the outputs of the
    model ``nnx.merge(graphdef, params, rest)``, ``d = direction`` (a tree like ``params``). One
    ``jax.jvp`` per chunk of rows (about the cost of a forward and a backward); jit-friendly."""
    chunks, _ = _chunks(batch, chunk_rows)
    direction = jax.tree.map(lambda d, p: d.astype(p.dtype), direction, params)

    def one(b):
        def f(p):
            return _logits(nnx.merge(graphdef, p, rest), b)[0]

        logits, tangent = jax.jvp(f, (params,), (direction,))
        return gauss_newton_sums(logits, tangent, targets(b)[1])

    s, n = jax.lax.map(one, chunks)
    return jnp.sum(s) / jnp.maximum(jnp.sum(n), 1.0)


def kl_between(
    graphdef: nnx.GraphDef, p_params: Any, q_params: Any, rest: Any, batch: Batch, *, chunk_rows: int = 4
) -> Array:
    """Mean ``KL(p ‖ q)`` per answer token of ``batch`` between two parameter sets of one model
    structure (teacher-forced on the batch's own tokens); jit-friendly."""
    sums = _kl_chunk_sums(
        lambda b: _logits(nnx.merge(graphdef, p_params, rest), b),
        lambda b: _logits(nnx.merge(graphdef, q_params, rest), b)[0],
        batch,
        chunk_rows,
    )
    return sums[0] / jnp.maximum(sums[1], 1.0)


def _kl_chunk_sums(p_fn: Callable, q_fn: Callable, batch: Batch, chunk_rows: int) -> tuple[Array, Array]:
    chunks, _ = _chunks(batch, chunk_rows)

    def one(b):
        p_logits, mask = p_fn(b)
        return kl_sums(p_logits, q_fn(b), mask)

    s, n = jax.lax.map(one, chunks)
    return jnp.sum(s), jnp.sum(n)


@nnx.jit(static_argnames=("chunk_rows",))
def _model_kl_sums(p_model, q_model, batch, chunk_rows):
    return _kl_chunk_sums(lambda b: _logits(p_model, b), lambda b: _logits(q_model, b)[0], batch, chunk_rows)


def token_kl(p_model: Any, q_model: Any, batches: Iterable[Batch], *, chunk_rows: int = 4) -> float:
    """Mean ``KL(p_model ‖ q_model)`` per answer token over ``batches`` (teacher-forced: both models
    read the batch's own tokens; each answer token weighs the same). The two models need only share
    a tokenizer, e.g. the retain model and an unlearned one ("distance to retraining")."""
    total, count = 0.0, 0.0
    for b in batches:
        b = {k: jnp.asarray(b[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
        s, n = _model_kl_sums(p_model, q_model, b, int(chunk_rows))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


__all__ = ["gauss_newton_quadratic", "gauss_newton_sums", "kl_between", "kl_sums", "token_kl"]
