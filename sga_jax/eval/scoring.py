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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import logprobs
from sga_jax.data.batching import bucket_length, iterate_batches
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
    logprobs.check_positions(model, max((len(r) for r in rows), default=0), "sequences", "lower max_length")
    for idx, batch in iterate_batches(
        rows, batch_size, pad_id=pad_id, padding_side="right", bucket=bucket, sort_by_length=True
    ):
        arrays = batch_token_logprobs(model, batch, stats=stats)
        mask = arrays[1].astype(bool)
        for row, i in enumerate(idx):
            sel = mask[row]
            yield i, tuple(a[row][sel] for k, a in enumerate(arrays) if k != 1)


def summed_nll(
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


# ------------------------------------------------------------------ shared-prefix (grouped) scoring


def split_shared_prefix(seqs: Sequence[Encoded]) -> tuple[list[int], list[Encoded]]:
    """``(prefix, suffixes)``: the longest common prefix of ``seqs``' token ids that holds no target
    token and is not the token before the first target (so every target is predicted from inside
    its suffix), and each sequence with that prefix cut off.

    TOFU scores 4-7 answers (gt, paraphrase, perturbations) to one question: the prompt — about half
    of each sequence for SmolLM2's chat template — is then run once per question instead of once
    per answer. The prefix is found on the token ids, not on the text, so BPE merges at the
    prompt/answer boundary cannot make a suffix differ from the sequence it came from.
    """
    if not seqs:
        return [], []
    first = seqs[0].input_ids
    n = min(len(s) for s in seqs)
    for s in seqs:
        # the token before the first target must stay in the suffix (its logits predict the target)
        t = next((j for j, m in enumerate(s.loss_mask) if m), len(s))
        n = min(n, max(t - 1, 0))
    lcp = 0
    while lcp < n and all(s.input_ids[lcp] == first[lcp] for s in seqs):
        lcp += 1
    suffixes = [Encoded(list(s.input_ids[lcp:]), list(s.loss_mask[lcp:]), s.truncated) for s in seqs]
    return list(first[:lcp]), suffixes


@nnx.jit
def _prefill(model, ids, mask):
    """KV cache ``[R, P]`` of left-padded prefixes ``[R, P]`` (no logits: XLA drops the unused LM head)."""
    b, p = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    _, cache = model.decode(ids, positions, model.init_cache(b, p), 0, mask)
    return cache


@nnx.jit
def _suffix_logprobs(model, cache, prefix_mask, group_row, ids, loss_mask):
    """``log p(ids[:, t+1] | prefix, ids[:, :t+1])`` on targets ``[B, S-1]`` for right-padded
    suffixes ``ids [B, S]``, suffix b following the cached prefix ``[R, P]`` of row
    ``group_row[b]``. The prefix cache is gathered and extended by ``S`` empty slots here, so the
    suffix attends to ``P + S`` slots only (not to the longest suffix of its chunk). Padding after
    a suffix is causal-masked for the real tokens before it, so the suffix slots' key mask can stay
    all ones."""
    s = ids.shape[1]

    def rows(c):  # a cache leaf [(L,) R, P, kv heads, head dim]: batch axis 1 when layers are scanned
        c = jnp.take(c, group_row, axis=c.ndim - 4)
        pad = [(0, 0)] * c.ndim
        pad[c.ndim - 3] = (0, s)
        return jnp.pad(c, pad)

    cache = jax.tree.map(rows, cache)
    prefix_mask = prefix_mask[group_row]
    b, p = prefix_mask.shape
    kv_mask = jnp.concatenate([prefix_mask, jnp.ones((b, s), prefix_mask.dtype)], axis=1)
    positions = jnp.sum(prefix_mask, axis=-1, keepdims=True) + jnp.arange(s)[None]
    logits, _ = model.decode(ids, positions.astype(jnp.int32), cache, p, kv_mask)
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return (picked - jax.nn.logsumexp(logits, axis=-1)) * loss_mask[:, 1:]


def _left_padded(prefixes: Sequence[Any], batch_size: int, length: int, pad_id: int):
    """``(ids, mask)`` ``[batch_size, length]``: the prefixes left-padded (rows past them all pad)."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, prefix in enumerate(prefixes):
        if prefix:
            ids[row, length - len(prefix) :] = prefix
            mask[row, length - len(prefix) :] = 1
    return ids, mask


def _suffix_batch(chunk: Sequence[tuple[int, Encoded]], batch_size: int, length: int, pad_id: int):
    """``(ids, loss_mask, cache rows)`` of ``(cache row, suffix)`` pairs, right-padded to
    ``[batch_size, length]`` (padding rows read cache row 0 and score nothing)."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    loss = np.zeros((batch_size, length), np.int32)
    rows = np.zeros((batch_size,), np.int32)
    for b, (row, suffix) in enumerate(chunk):
        ids[b, : len(suffix)] = suffix.input_ids
        loss[b, : len(suffix)] = suffix.loss_mask
        rows[b] = row
    return ids, loss, rows


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def suffix_length(n: int, bucket: int) -> int:
    """A suffix batch's length: the next power of two below ``bucket``, else a multiple of it.
    TOFU's real-author / world-fact answers are 4-13 tokens, so a 16-token floor would more than
    double their work; powers of two keep the number of distinct (compiled) lengths small."""
    return _pow2_ceil(n) if n < bucket else bucket_length(n, bucket)


def suffix_batches(lengths: Sequence[int], budget: int, bucket: int) -> list[tuple[int, int, list[int]]]:
    """``[(rows, length, item indices)]``: the items longest first, each batch ``length`` =
    :func:`suffix_length` of its longest and ``rows`` the largest power of two with ``rows ×
    length <= budget`` — short suffixes go in big batches, every call does about the same work,
    and the (rows, length) shapes form a short fixed list that repeats across chunks and splits
    (one XLA compile each). The last batch takes the smallest power of two that holds what is left."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    out, start = [], 0
    while start < len(order):
        t = suffix_length(lengths[order[start]], bucket)
        rows = _pow2_floor(budget // t)
        take = order[start : start + rows]
        out.append((min(rows, _pow2_ceil(len(take))), t, take))
        start += len(take)
    return out


def _prefill_chunks(
    prefix_lengths: Sequence[int], budget: int, bucket: int
) -> list[tuple[int, int, list[int]]]:
    """``[(rows, prefix length, group indices)]``: groups by prefix length, as many per prefill as
    fit ``budget`` tokens (a multiple of 8 rows, at least 8): their suffixes then share one pool,
    so the suffix batches are full."""
    order = sorted(range(len(prefix_lengths)), key=lambda k: prefix_lengths[k])
    out, start = [], 0
    while start < len(order):
        # the chunk's length is set by its longest prefix: fix it from the longest that could join
        p_len = bucket_length(prefix_lengths[order[min(start + 8, len(order)) - 1]], bucket)
        cap = max(8, budget // p_len // 8 * 8)
        idx = order[start : start + cap]
        p_len = bucket_length(max(prefix_lengths[i] for i in idx), bucket)
        out.append((-(-len(idx) // 8) * 8, p_len, idx))
        start += len(idx)
    return out


def grouped_sequence_nll(
    model: Any,
    groups: Sequence[Sequence[Encoded]],
    *,
    pad_id: int,
    batch_size: int = 16,
    bucket: int = 16,
    token_budget: int | None = None,
    progress: Callable[[int], Any] | None = None,
    calls: list[tuple] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`summed_nll` of every sequence of every group, each group's shared prefix
    (:func:`split_shared_prefix`) run once through the KV cache: per group ``(total [K], count [K])``.

    Groups are sorted by prefix length and prefilled in chunks of about ``2 · token_budget``
    prefix tokens (:func:`_prefill_chunks`; left-padded to a multiple of ``bucket``); all suffixes
    of a chunk then form one pool, cut by :func:`suffix_batches` into right-padded batches of
    about ``token_budget`` tokens (default ``batch_size × 128``), each suffix reading its group's
    cache row. ``progress(n)`` is called as sequences are scored. ``calls``: when a list, each call
    is appended as ``("prefill", rows, prefix length, cache length)`` or ``("suffix", rows, suffix
    length, cache length)`` (for :mod:`sga_jax.eval.flops`).
    """
    longest = max((len(e) for g in groups for e in g), default=0)
    logprobs.check_positions(model, longest, "prompts with their answers", "lower max_length")
    budget = token_budget or batch_size * 128
    split = [split_shared_prefix(g) for g in groups]
    out = [(np.zeros(len(g), np.float64), np.zeros(len(g), np.int64)) for g in groups]
    for n_rows, p_len, idx in _prefill_chunks([len(p) for p, _ in split], 2 * budget, bucket):
        pre_ids, pre_mask = _left_padded([split[i][0] for i in idx], n_rows, p_len, pad_id)
        pre_mask_j = jnp.asarray(pre_mask)
        cache = _prefill(model, jnp.asarray(pre_ids), pre_mask_j)
        if calls is not None:
            calls.append(("prefill", n_rows, p_len, p_len))
        items = [(row, i, k) for row, i in enumerate(idx) for k in range(len(split[i][1]))]
        lengths = [len(split[i][1][k]) for _, i, k in items]
        for rows_n, t_len, take in suffix_batches(lengths, budget, bucket):
            chunk = [items[j] for j in take]
            ids, loss, rows = _suffix_batch(
                [(row, split[i][1][k]) for row, i, k in chunk], rows_n, t_len, pad_id
            )
            logp = _suffix_logprobs(
                model, cache, pre_mask_j, jnp.asarray(rows), jnp.asarray(ids), jnp.asarray(loss)
            )
            logp = np.asarray(logp)
            if calls is not None:
                calls.append(("suffix", rows_n, t_len, p_len + t_len))
            for b, (_, i, k) in enumerate(chunk):
                sel = loss[b, 1:].astype(bool)
                out[i][0][k] = -float(np.sum(logp[b][sel], dtype=np.float64))
                out[i][1][k] = int(sel.sum())
            if progress is not None:
                progress(len(chunk))
    return out
