"""Extraction strength and exact memorization (open-unlearning, ``src/evals/metrics/memorization.py``
at commit d3d7cf9), from a model's teacher-forced greedy predictions over an answer.

For a row whose answer tokens are ``y_1 .. y_n`` and ``ŷ_t = argmax_v p(v | x, y_<t)`` (the
teacher-forced greedy prediction of token t):

* exact memorization (Tirumala et al. 2022): ``EM = (1/n) Σ_t [ŷ_t = y_t]``, the fraction of answer
  tokens the model predicts; None for a row with no answer token (open-unlearning's ``score: None``,
  left out of the mean).
* extraction strength (Carlini et al. 2021; open-unlearning's paper, arXiv 2506.12618):
  ``ES = 1 − k/n`` with ``k`` the smallest index such that the suffix ``ŷ_{k+1..n}`` equals
  ``y_{k+1..n}``: the fraction of the answer the model completes from the shortest prefix it is
  given. open-unlearning searches ``k`` over ``0 .. n−1`` only, so an answer whose last token is
  not predicted still scores ``1/n`` (not 0); a row with no answer token scores 0. Both are kept.

Answer tokens are open-unlearning's: ``tokenwise_vocab_logprobs`` (``src/evals/metrics/utils.py``
lines 172-175) drops the last labelled token ("to ignore eos prediction"), so
:func:`memorization_scores` drops each row's last target token by default (``drop_last``): the EOS
that TOFU's plain template appends, or the chat template's end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import logprobs
from sga_jax.data.batching import iterate_batches
from sga_jax.data.formatting import Encoded


def exact_memorization(preds: np.ndarray, labels: np.ndarray) -> float | None:
    """``mean_t [preds_t == labels_t]`` over the answer tokens; None when there are none.

    open-unlearning ``memorization.py`` lines 201-204 (``_exact_memorization``):
    ``(argmax(log_probs) == labels).sum() / valid_len``.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if labels.size == 0:
        return None
    return float(np.sum(preds == labels) / labels.size)


def extraction_strength(preds: np.ndarray, labels: np.ndarray) -> float:
    """``1 − k/n``, ``k`` the first index in ``0 .. n−1`` whose suffix ``preds[k:]`` equals
    ``labels[k:]`` (``k = n−1`` when none does: the score is then ``1/n``); 0 when ``n = 0``.

    open-unlearning ``memorization.py`` lines 236-254 (``_extraction_strength``).
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    n = labels.size
    if n == 0:
        return 0.0
    wrong = np.flatnonzero(preds != labels)
    # preds[k:] == labels[k:] first holds just past the last mismatch; capped at n-1 as the loop
    k = 0 if wrong.size == 0 else min(int(wrong[-1]) + 1, n - 1)
    return 1.0 - k / n


@nnx.jit
def _greedy_predictions(model, input_ids, attention_mask, loss_mask):
    """``(argmax_v logits[b, t], input_ids[b, t+1], target mask)``, each ``[B, T-1]``: the
    teacher-forced greedy prediction of every next token. Takes the full logits (``[B, T, V]``)."""
    batch = {"input_ids": input_ids, "loss_mask": loss_mask * attention_mask}
    labels, mask = logprobs.targets(batch)
    logits = model(input_ids, attention_mask)[:, :-1]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), labels, mask.astype(jnp.int32)


def memorization_scores(
    model: Any,
    rows: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 16,
    drop_last: bool = True,
) -> dict[str, np.ndarray]:
    """Per row, ``{"extraction_strength": [N], "exact_memorization": [N]}`` (NaN where EM is None)
    over the row's target tokens (its answer), the last one dropped when ``drop_last`` (as
    open-unlearning; see the module docstring). One batched forward pass per batch."""
    logprobs.check_positions(model, max((len(r) for r in rows), default=0), "sequences", "lower max_length")
    es = np.zeros(len(rows), np.float64)
    em = np.full(len(rows), np.nan, np.float64)
    for idx, batch in iterate_batches(
        rows, batch_size, pad_id=pad_id, padding_side="right", bucket=32, sort_by_length=True
    ):
        out = _greedy_predictions(
            model, *(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
        )
        preds, labels, mask = (np.asarray(o) for o in out)
        for row, i in enumerate(idx):
            sel = mask[row].astype(bool)
            p, y = preds[row][sel], labels[row][sel]
            if drop_last:
                p, y = p[:-1], y[:-1]
            es[i] = extraction_strength(p, y)
            value = exact_memorization(p, y)
            em[i] = np.nan if value is None else value
    return {"extraction_strength": es, "exact_memorization": em}


def mean_scores(scores: dict[str, np.ndarray]) -> dict[str, float | None]:
    """The means of :func:`memorization_scores` (open-unlearning's ``agg_value``), EM over the rows
    that have one (None when none does: no number, not a NaN in ``results.json``)."""
    em = scores["exact_memorization"]
    em = em[~np.isnan(em)]
    return {
        "extraction_strength": float(np.mean(scores["extraction_strength"])),
        "exact_memorization": float(np.mean(em)) if em.size else None,
    }
