"""Model-level per-token log-probs and per-sequence NLL through :mod:`sga_jax.kernels`.

Token t+1 is predicted from the final hidden state at t (the causal shift): for a batch
``{"input_ids", "attention_mask", "loss_mask"}`` each ``[B, T]``, the log-probs are ``[B, T-1]``
with mask ``loss_mask[:, 1:]``. The LM head is applied by the chunked kernel, so the
``[B, T, V]`` float32 logits are never materialised (docs/interfaces.md); a model's final logit
soft-cap (``model.logit_softcap``, Gemma 2) is applied inside the kernel.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sga_jax import kernels
from sga_jax.errors import DataError


def token_logprobs(
    model,
    batch: Mapping[str, jax.Array],
    implementation: str = "chunked",
    **kernel_kwargs,
) -> tuple[jax.Array, jax.Array]:
    """``(logp [B, T-1] float32, mask [B, T-1] bool)``: log p(token t+1 | tokens <= t) on target tokens.

    ``logp`` is 0 where the mask is false. ``kernel_kwargs`` go to
    :func:`sga_jax.kernels.token_logprobs` (``chunk_size``, ``token_chunk_size``).
    """
    for key in ("input_ids", "loss_mask"):
        if key not in batch:
            raise DataError(f"batch has no {key!r} (keys: {sorted(batch)})")
    ids = jnp.asarray(batch["input_ids"])
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise DataError(f"input_ids must be [B, T] with T >= 2, got shape {ids.shape}")
    attn = batch.get("attention_mask")
    hidden = model.hidden_states(ids, attention_mask=attn)
    weight, bias = model.lm_head_weights()
    b, t, d = hidden.shape
    mask = jnp.asarray(batch["loss_mask"])[:, 1:].astype(bool)
    labels = jnp.where(mask, ids[:, 1:], -1).astype(jnp.int32)
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


def sequence_nll(
    model,
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
