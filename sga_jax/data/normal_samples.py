"""Normal samples for SGA: for each forget example, K-1 examples from a pool (the retain set).

Smoothed Gradient Ascent (arXiv 2510.22376, Sec. 4) smooths each forget sample's label over K-1
*normal* samples that resemble it. Similarity is the cosine of sentence embeddings, here the
mask-aware mean of the model's final hidden states (computed once, batched and jitted, before
training). Retrieval is deterministic given the seed (the seed only breaks exact ties) and never
returns a forget example. The pairing is saved with the run (JSON) so it can be inspected.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sga_jax.errors import ConfigError, DataError
from sga_jax.logprobs import padded_runner

Batch = Mapping[str, np.ndarray]


def _mean_hidden(model, input_ids, attention_mask, pool_mask):
    h = model.hidden_states(input_ids, attention_mask=attention_mask).astype(jnp.float32)
    m = pool_mask.astype(jnp.float32)[..., None]
    return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def embed(
    model,
    batches: Batch | Iterable[Batch],
    *,
    batch_size: int = 16,
    mask: str = "attention_mask",
) -> np.ndarray:
    """Sentence embeddings ``[N, d]`` float32: the mean of the final hidden states over ``mask``.

    Args:
      model: a sga_jax model (``model.hidden_states(input_ids, attention_mask)``).
      batches: one batch dict with all rows (``input_ids``, ``attention_mask``, ``loss_mask`` each
        ``[N, T]``), split here into micro-batches of ``batch_size``, or an iterable of batch dicts.
      mask: which mask to average over: ``"attention_mask"`` (question + answer) or ``"loss_mask"``.
    """
    if isinstance(batches, Mapping):
        batches = [batches]

    def mean_hidden(model, b):
        return _mean_hidden(model, b["input_ids"], b["attention_mask"], b["pool"])

    run = padded_runner(mean_hidden, model, batch_size)
    out = []
    for batch in batches:
        if mask not in batch:
            raise DataError(f"embed: the batch has no {mask!r} (keys: {sorted(batch)})")
        ids = np.asarray(batch["input_ids"], np.int32)
        attn = np.asarray(batch.get("attention_mask", np.ones_like(ids)), np.int32)
        pool = np.asarray(batch[mask], np.int32)
        if ids.shape[0]:
            out.append(run({"input_ids": ids, "attention_mask": attn, "pool": pool}))
    if not out:
        raise DataError("embed: no rows to embed")
    return np.concatenate(out).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _excluded(num_pool: int, forget_ids_in_pool: Sequence[int] | None) -> np.ndarray:
    banned = np.zeros(num_pool, bool)
    if forget_ids_in_pool is not None:
        ids = np.asarray(list(forget_ids_in_pool), np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_pool):
            raise ConfigError(f"forget_ids_in_pool must index the pool [0, {num_pool}), got {ids.tolist()}")
        banned[ids] = True
    return banned


def _check_k(k_minus_1: int, available: int) -> None:
    if int(k_minus_1) != k_minus_1 or k_minus_1 < 1:
        raise ConfigError(f"K-1 normal samples per forget example must be >= 1 (K >= 2), got {k_minus_1}")
    if k_minus_1 > available:
        raise DataError(f"the pool has {available} usable examples, fewer than K-1 = {k_minus_1}")


def retrieve_normal_samples(
    forget_emb: np.ndarray,
    pool_emb: np.ndarray,
    k_minus_1: int,
    *,
    forget_ids_in_pool: Sequence[int] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """For each forget embedding, the indices of its ``k_minus_1`` most cosine-similar pool rows.

    Args:
      forget_emb: ``[N, d]``; pool_emb: ``[M, d]``.
      k_minus_1: K-1 normal samples per forget example.
      forget_ids_in_pool: pool indices that are themselves forget examples (never returned).
      seed: breaks exact similarity ties, so the result is deterministic given the seed.

    Returns:
      ``[N, K-1]`` int64 pool indices, most similar first.
    """
    f = np.asarray(forget_emb)
    p = np.asarray(pool_emb)
    if f.ndim != 2 or p.ndim != 2 or f.shape[1] != p.shape[1]:
        raise ConfigError(
            f"embeddings must be [N, d] and [M, d] with the same d, got {f.shape} and {p.shape}"
        )
    banned = _excluded(p.shape[0], forget_ids_in_pool)
    _check_k(k_minus_1, int((~banned).sum()))
    sim = _normalise(f) @ _normalise(p).T  # [N, M] cosine, float64
    sim[:, banned] = -np.inf
    tiebreak = np.random.default_rng(seed).permutation(p.shape[0])
    out = np.empty((f.shape[0], k_minus_1), np.int64)
    for i in range(f.shape[0]):
        # Primary key: similarity (descending); secondary: the seeded permutation.
        order = np.lexsort((tiebreak, -sim[i]))
        out[i] = order[:k_minus_1]
    return out


def random_pairing(
    num_forget: int,
    num_pool: int,
    k_minus_1: int,
    *,
    forget_ids_in_pool: Sequence[int] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Fallback pairing: ``k_minus_1`` distinct random pool rows per forget example (seeded)."""
    banned = _excluded(num_pool, forget_ids_in_pool)
    allowed = np.flatnonzero(~banned)
    _check_k(k_minus_1, allowed.size)
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(allowed, k_minus_1, replace=False) for _ in range(num_forget)]).astype(
        np.int64
    )


def retrieve(
    model,
    forget: Batch,
    pool: Batch,
    k_minus_1: int,
    *,
    forget_ids_in_pool: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    mask: str = "attention_mask",
) -> np.ndarray:
    """:func:`embed` both sets with ``model``, then :func:`retrieve_normal_samples`."""
    f = embed(model, forget, batch_size=batch_size, mask=mask)
    p = embed(model, pool, batch_size=batch_size, mask=mask)
    return retrieve_normal_samples(f, p, k_minus_1, forget_ids_in_pool=forget_ids_in_pool, seed=seed)


def save_pairing(
    path: str | os.PathLike, pairing: np.ndarray, *, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``{"forget_to_pool": [[...], ...], "meta": {...}}`` to ``path`` (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"forget_to_pool": np.asarray(pairing, np.int64).tolist(), "meta": dict(meta or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_pairing(path: str | os.PathLike) -> np.ndarray:
    """The ``[N, K-1]`` pairing written by :func:`save_pairing`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        rows = doc["forget_to_pool"]
    except FileNotFoundError as e:
        raise DataError(f"no pairing file at {path}") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a pairing file written by save_pairing ({e})") from e
    arr = np.asarray(rows, np.int64)
    if arr.ndim != 2:
        raise DataError(f"{path}: the pairing must be a list of equal-length rows")
    return arr


def forget_rows_in_pool(forget: Batch, pool: Batch) -> list[int]:
    """Pool rows whose tokens (and answer mask) equal a forget row's: never to be normal samples."""

    def keys(b: Batch) -> list[bytes]:
        out = []
        for ids, attn, loss in zip(b["input_ids"], b["attention_mask"], b["loss_mask"]):
            on = attn.astype(bool)
            out.append(ids[on].astype(np.int64).tobytes() + b"|" + loss[on].astype(np.int8).tobytes())
        return out

    forget_keys = set(keys(forget))
    return [j for j, key in enumerate(keys(pool)) if key in forget_keys]


def normal_index(model, data: Any, m: Any, *, seed: int) -> np.ndarray:
    """``[N, K-1]`` row indices of each forget row's SGA normal samples (``m``: an SGA method config;
    ``data``: a :class:`sga_jax.train.TrainData`): into ``data.normal`` (the rows of
    ``method.normal_file``, in order) or into the retain pool, where retrieval and random pairing
    are told which pool rows are forget rows so that they never return one."""
    k, n = m.k, data.num_forget
    if m.normal_samples == "file":
        return np.arange(n * (k - 1), dtype=np.int64).reshape(n, k - 1)
    assert data.retain is not None
    n_pool = data.retain["input_ids"].shape[0]
    banned = forget_rows_in_pool(data.forget, data.retain)
    if banned:
        print(
            f"sga-jax: warning: {len(banned)} retain rows are also forget rows; they are never used as "
            "normal samples",
            file=sys.stderr,
        )
    if n_pool - len(banned) < k - 1:
        raise DataError(
            f"data.retain: {n_pool - len(banned)} retain rows that are not forget rows; method.k - 1 = "
            f"{k - 1} normal samples are needed"
        )
    if m.normal_samples == "random":
        idx = random_pairing(n, n_pool, k - 1, forget_ids_in_pool=banned, seed=seed)
    else:
        idx = retrieve(model, data.forget, data.retain, k - 1, forget_ids_in_pool=banned, seed=seed)
    return np.asarray(idx, dtype=np.int64).reshape(n, k - 1)
