"""Jitted per-token log-probabilities of batches, shared by the TOFU, MUSE and MIA evaluations.

For a batch (docs/interfaces.md) token t is predicted from position t-1:
``logp[b, t-1] = log softmax(logits[b, t-1])[input_ids[b, t]]`` on target tokens (``loss_mask``).
With ``stats=True`` also the mean and standard deviation of ``log p`` under the model's own
next-token distribution (``mu = Σ_v p_v log p_v``, ``sigma² = Σ_v p_v (log p_v)² − mu²``), which
Min-K%++ (Zhang et al. 2024, arXiv 2404.02936, eq. 3) needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import logprobs
from sga_jax.data.batching import iterate_batches
from sga_jax.data.formatting import Encoded


@nnx.jit(static_argnames=("stats",))
def _token_logprobs(model, input_ids, attention_mask, loss_mask, *, stats: bool = False):
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask * attention_mask,
    }
    if not stats:
        # The chunked kernel: no [B, T, V] float32 logits (the LM head of a 49k-150k vocabulary).
        logp, mask = logprobs.token_logprobs(model, batch)
        return logp, mask.astype(jnp.int32)
    # Min-K%++ needs the whole next-token distribution, so this path takes the full logits.
    logp, mask, mu, sigma = logprobs.token_logprobs_full(model, batch)
    return logp, mask.astype(jnp.int32), mu, sigma


def batch_token_logprobs(model: Any, batch: dict[str, np.ndarray], *, stats: bool = False):
    """``(logp [B, T-1], mask [B, T-1])`` (+ ``mu, sigma`` when ``stats``) as numpy arrays."""
    out = _token_logprobs(
        model,
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["loss_mask"]),
        stats=stats,
    )
    return tuple(np.asarray(o) for o in out)


def iterate_token_logprobs(
    model: Any,
    rows: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 16,
    bucket: int = 32,
    stats: bool = False,
) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
    """For each row (in length-sorted batches): ``(row index, per-target-token arrays)`` where the
    arrays are ``logp`` (and ``mu, sigma``) restricted to that row's target tokens, in order."""
    for idx, batch in iterate_batches(
        rows, batch_size, pad_id=pad_id, padding_side="right", bucket=bucket, sort_by_length=True
    ):
        arrays = batch_token_logprobs(model, batch, stats=stats)
        mask = arrays[1].astype(bool)
        for row, i in enumerate(idx):
            sel = mask[row]
            yield i, tuple(a[row][sel] for k, a in enumerate(arrays) if k != 1)


def sequence_nll(
    model: Any,
    rows: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 16,
    bucket: int = 32,
    progress: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL over target tokens and the number of target tokens, per row: ``([N], [N])``.
    ``progress(n)`` is called as rows are scored (e.g. a tqdm bar's ``update``)."""
    total = np.zeros(len(rows), np.float64)
    count = np.zeros(len(rows), np.int64)
    for i, (logp,) in iterate_token_logprobs(
        model, rows, pad_id=pad_id, batch_size=batch_size, bucket=bucket
    ):
        total[i] = -float(np.sum(logp, dtype=np.float64))
        count[i] = logp.shape[0]
        if progress is not None:
            progress(1)
    return total, count
