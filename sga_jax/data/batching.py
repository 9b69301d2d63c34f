"""Collating encoded rows into fixed-shape int32 batches (docs/interfaces.md).

Lengths are padded up to a multiple of ``bucket`` (and the batch dimension to ``batch_size``), so a
jitted function compiles once per shape bucket instead of once per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from sga_jax.data.formatting import Encoded
from sga_jax.errors import ConfigError


def bucket_length(n: int, multiple: int = 16, *, cap: int | None = None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (never above ``cap`` when given and ≥ n)."""
    if multiple < 1:
        raise ConfigError(f"bucket multiple must be positive, got {multiple}")
    b = -(-max(int(n), 1) // multiple) * multiple
    if cap is not None and n <= cap:
        b = min(b, cap)
    return b


def collate(
    rows: Sequence[Encoded],
    *,
    pad_id: int,
    padding_side: str = "right",
    bucket: int = 16,
    length: int | None = None,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask", "loss_mask"}`` int32 ``[B, T]``.

    ``T`` = ``length`` or the longest row rounded up to ``bucket``; ``B`` = ``batch_size`` (extra
    rows are all padding, attention 0) or ``len(rows)``.
    """
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max((len(r) for r in rows), default=1)
    t = length if length is not None else bucket_length(longest, bucket)
    if longest > t:
        raise ConfigError(f"a row of {longest} tokens does not fit the batch length {t}")
    b = batch_size if batch_size is not None else len(rows)
    if len(rows) > b:
        raise ConfigError(f"{len(rows)} rows do not fit batch_size={b}")
    ids = np.full((b, t), pad_id, np.int32)
    attn = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.int32)
    for i, r in enumerate(rows):
        n = len(r)
        sl = slice(t - n, t) if padding_side == "left" else slice(0, n)
        ids[i, sl] = r.input_ids
        attn[i, sl] = 1
        loss[i, sl] = r.loss_mask
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def iterate_batches(
    rows: Sequence[Encoded],
    batch_size: int,
    *,
    pad_id: int,
    padding_side: str = "right",
    bucket: int = 16,
    sort_by_length: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    fixed_batch: bool = True,
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Yield ``(row indices, batch)``; the last batch is padded to ``batch_size`` rows when
    ``fixed_batch`` (its padding rows have no index). ``sort_by_length`` groups rows of similar
    length (less padding, fewer buckets) — for evaluation, where order does not matter."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    order = np.arange(len(rows))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(rows))
    elif sort_by_length:
        order = np.argsort([len(r) for r in rows], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = [int(i) for i in order[start : start + batch_size]]
        batch = collate(
            [rows[i] for i in idx],
            pad_id=pad_id,
            padding_side=padding_side,
            bucket=bucket,
            batch_size=batch_size if fixed_batch else None,
        )
        yield idx, batch
