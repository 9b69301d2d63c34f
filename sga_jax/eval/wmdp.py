"""WMDP-format multiple-choice accuracy: lm-evaluation-harness' scoring of the four answer letters."""

from __future__ import annotations

from typing import Any

import numpy as np

from sga_jax.data.formatting import Encoded
from sga_jax.data.wmdp import choice_continuations, format_prompt
from sga_jax.errors import DataError
from sga_jax.eval.scoring import summed_nll


def wmdp_accuracy(model: Any, tokenizer: Any, rows: list[dict], *, batch_size: int = 8) -> dict[str, Any]:
    """Accuracy of picking the letter (" A" .. " D") with the highest log-probability after the
    WMDP prompt (lm-evaluation-harness' multiple-choice scoring)."""
    seqs = []
    for r in rows:
        prompt = tokenizer(format_prompt(r), add_special_tokens=True)["input_ids"]
        for cont in choice_continuations():
            c = tokenizer(cont, add_special_tokens=False)["input_ids"]
            seqs.append(Encoded(list(prompt) + list(c), [0] * len(prompt) + [1] * len(c)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    nll, _ = summed_nll(model, seqs, pad_id=pad, batch_size=batch_size)
    if not np.isfinite(nll).all():  # argmin over NaN picks " A": a silent, wrong accuracy
        raise DataError("wmdp: the choices' log-probabilities are not finite (NaN or inf weights?)")
    pred = nll.reshape(len(rows), 4).argmin(axis=1)
    gold = np.array([r["answer"] for r in rows])
    return {"accuracy": float(np.mean(pred == gold)), "predictions": pred.tolist()}


__all__ = ["wmdp_accuracy"]
