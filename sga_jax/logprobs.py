"""Model-level per-token log-probs and per-sequence NLL through :mod:`sga_jax.kernels`: the one home
of "shift by one, mask, NLL".

``targets`` (the shift and the loss mask), ``token_logprobs`` (chunked LM head), ``sequence_nll``
(token mean or sum per row), ``token_logprobs_full`` (full logits plus the moments Min-K%++ needs),
and ``padded_runner`` / ``batched_nll`` (host-side, fixed-shape micro-batches: one compilation).

Token t+1 is predicted from the final hidden state at t (the causal shift): for a batch
``{"input_ids", "attention_mask", "loss_mask"}`` each ``[B, T]``, the log-probs are ``[B, T-1]``
with mask ``loss_mask[:, 1:]``. The LM head is applied by the chunked kernel, so the
``[B, T, V]`` float32 logits are never materialised (docs/interfaces.md); a model's final logit
soft-cap (``model.logit_softcap``, Gemma 2) is applied inside the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import kernels
from sga_jax.errors import DataError


def position_limit(model: Any) -> int | None:
    """The longest sequence a model with a learned position table (OPT) can read, its
    ``max_position_embeddings``; None for rotary models, which have no table to run off. Past the
    table JAX's gather fills NaN: a silent NaN perplexity, or a NaN training loss."""
    if getattr(model, "embed_positions", None) is None:
        return None
    return int(model.config.max_position_embeddings)


def check_positions(model: Any, length: int, what: str, advice: str) -> None:
    """A DataError when ``length`` tokens run past :func:`position_limit` (``what`` names them,
    ``advice`` says which setting to lower)."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise DataError(
            f"{what} reach {length} tokens, but {model.config.model_type} has learned positions for "
            f"only {limit} (max_position_embeddings); {advice} to {limit} or lower"
        )


@runtime_checkable
class Model(Protocol):
    """What log-probs, the methods and K-FAC need of a model (docs/interfaces.md, "Models"): every
    port in :mod:`sga_jax.models` satisfies it (``models.layers.DecoderLM``)."""

    config: Any

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, T, V]`` float32 (soft-capped where the model caps them)."""
        ...

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Final hidden states ``[B, T, d]``, after the final norm."""
        ...

    def lm_head_weights(self) -> tuple[jax.Array, jax.Array | None]:
        """``(W [d, V], b [V] | None)``."""
        ...

    @property
    def logit_softcap(self) -> float | None:
        """The final logit soft-cap the log-prob kernels must apply, or None."""
        ...


def targets(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(labels [B, T-1] int32, mask [B, T-1] bool)``: the causal shift and the loss mask, once.

    Token t+1 is the target of position t; it counts where ``loss_mask[:, 1:]`` is set (answer
    tokens; prompt and padding are 0 in a batch from ``sga_jax.data``). Labels are -1 off the mask.
    """
    for key in ("input_ids", "loss_mask"):
        if key not in batch:
            raise DataError(f"batch has no {key!r} (keys: {sorted(batch)})")
    ids = jnp.asarray(batch["input_ids"])
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise DataError(f"input_ids must be [B, T] with T >= 2, got shape {ids.shape}")
    mask = jnp.asarray(batch["loss_mask"])[:, 1:].astype(bool)
    return jnp.where(mask, ids[:, 1:], -1).astype(jnp.int32), mask


def token_logprobs(
    model: Model,
    batch: Mapping[str, jax.Array],
    implementation: str = "chunked",
    **kernel_kwargs,
) -> tuple[jax.Array, jax.Array]:
    """``(logp [B, T-1] float32, mask [B, T-1] bool)``: log p(token t+1 | tokens <= t) on target tokens.

    ``logp`` is 0 where the mask is false. ``kernel_kwargs`` go to
    :func:`sga_jax.kernels.token_logprobs` (``chunk_size``, ``token_chunk_size``).
    """
    labels, mask = targets(batch)
    hidden = model.hidden_states(jnp.asarray(batch["input_ids"]), attention_mask=batch.get("attention_mask"))
    weight, bias = model.lm_head_weights()
    b, t, d = hidden.shape
    logp = kernels.token_logprobs(
        hidden[:, :-1].reshape(b * (t - 1), d),
        weight.astype(hidden.dtype),
        labels.reshape(-1),
        bias,
        implementation=implementation,
        softcap=getattr(model, "logit_softcap", None),  # Gemma 2's final logit soft-capping
        **kernel_kwargs,
    )
    return logp.reshape(b, t - 1), mask


def token_logprobs_full(model: Model, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, ...]:
    """``(logp, mask, mu, sigma)``, each ``[B, T-1]``, from the full float32 logits: what Min-K%++
    (Zhang et al. 2024, arXiv 2404.02936, eq. 3) needs besides the log-probs, the mean and standard
    deviation of ``log p`` under the model's own next-token distribution (``mu = Σ_v p_v log p_v``,
    ``sigma² = Σ_v p_v (log p_v)² − mu²``). This path materialises ``[B, T-1, V]`` logits; use
    :func:`token_logprobs` whenever the whole distribution is not needed."""
    _, mask = targets(batch)
    ids = jnp.asarray(batch["input_ids"])
    logits = model(ids, batch.get("attention_mask"))[:, :-1].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    logp = (picked - logz) * mask
    log_probs = logits - logz[..., None]
    probs = jnp.exp(log_probs)
    mu = jnp.sum(probs * log_probs, axis=-1)
    var = jnp.sum(probs * jnp.square(log_probs), axis=-1) - jnp.square(mu)
    return logp, mask, mu, jnp.sqrt(jnp.maximum(var, 0.0))


def sequence_nll(
    model: Model,
    batch: Mapping[str, jax.Array],
    implementation: str = "chunked",
    *,
    reduction: str = "mean",
    **kernel_kwargs,
) -> jax.Array:
    """``[B]`` negative log-likelihood over each row's target tokens (0 for empty rows):
    the token mean (``reduction="mean"``) or the sum ``-log π(y|x)`` (``reduction="sum"``, NPO's)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logp, mask = token_logprobs(model, batch, implementation, **kernel_kwargs)
    m = mask.astype(jnp.float32)
    total = -jnp.sum(logp * m, axis=-1)
    return total if reduction == "sum" else total / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def num_targets(batch: Mapping[str, jax.Array]) -> jax.Array:
    """``[B]`` float32: how many target (answer) tokens each row has (``loss_mask[:, 1:]``)."""
    return jnp.sum(jnp.asarray(batch["loss_mask"])[:, 1:].astype(jnp.float32), axis=-1)


def padded_runner(
    fn: Callable[[Any, Mapping[str, jax.Array]], Any], model, batch_size: int = 16
) -> Callable[[Mapping[str, np.ndarray]], Any]:
    """A host function ``run(batch)`` that applies the jitted ``fn(model, micro_batch)`` to every row
    of ``batch`` (a dict of ``[N, ...]`` arrays) in micro-batches of ``batch_size`` rows, and returns
    ``fn``'s outputs (a pytree of ``[N, ...]`` numpy arrays) concatenated in row order.

    The last micro-batch is padded to ``batch_size`` by repeating its last row and the padded rows'
    outputs are dropped, so one compilation serves every micro-batch of a given length T. The model
    is split once (``nnx.split``) and passed as an argument, not baked into the program.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def jitted(state, b):
        return fn(nnx.merge(graphdef, state), b)

    def run(batch: Mapping[str, np.ndarray]) -> Any:
        n = next(iter(batch.values())).shape[0]
        if n == 0:
            raise DataError("padded_runner: the batch has no rows")
        outs = []
        for i in range(0, n, batch_size):
            b = {k: np.asarray(v[i : i + batch_size]) for k, v in batch.items()}
            pad = batch_size - b[next(iter(b))].shape[0]
            if pad:
                b = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in b.items()}
            outs.append(jax.tree.map(lambda x, pad=pad: np.asarray(x)[: batch_size - pad], jitted(state, b)))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    return run


def batched_nll(
    model, batch: Mapping[str, np.ndarray], batch_size: int = 16, *, reduction: str = "mean"
) -> np.ndarray:
    """``[N]`` float32 NLL of every row of a host batch (:func:`sequence_nll` through
    :func:`padded_runner`): the token mean, or the sum over the row's answer tokens (``"sum"``)."""
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    run = padded_runner(lambda m, b: sequence_nll(m, b, reduction=reduction), model, batch_size)
    return np.asarray(run(rows), np.float32)
