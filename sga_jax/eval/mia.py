"""Membership-inference scores, their ROC AUC, and perplexity.

Every score is oriented so that **higher = more likely a member** (seen in training), from the
per-token log-probs ``logp_t = log p(x_t | x_<t)`` of a text's target tokens:

* LOSS (Yeom et al. 2018): ``mean_t logp_t`` (= −NLL).
* zlib (Carlini et al. 2021, arXiv 2012.07805): ``−NLL / len(zlib.compress(text))`` (the log
  perplexity over the zlib entropy in bytes, negated).
* Min-K% (Shi et al. 2024, arXiv 2310.16789): the mean of the ``k`` fraction of lowest ``logp_t``
  (``max(1, int(k·n))`` tokens, as the reference code's ``int(len·ratio)``).
* Min-K%++ (Zhang et al. 2024, arXiv 2404.02936, eq. 3): the same over
  ``(logp_t − mu_t) / sigma_t``, with ``mu_t, sigma_t`` the mean / std of ``log p`` under the model's
  next-token distribution at t.

* gradnorm (Wang et al. 2024, arXiv 2402.17012; open-unlearning ``src/evals/metrics/mia/gradnorm.py``):
  ``−mean_θ ‖∇_θ NLL‖_p`` over the model's parameter tensors θ, NLL the text's token-mean NLL
  (a member has a smaller gradient).
* reference (open-unlearning ``mia/reference.py``): ``NLL_ref − NLL_model``, the loss gap to a
  reference model (e.g. the retain model) that never saw the members.

``auc(member_scores, nonmember_scores)`` is sklearn's ``roc_auc_score`` with members labelled 1.
MUSE's PrivLeak uses Min-K% with k = 0.4 on the forget and holdout texts, in MUSE's own labelling
(holdout = 1, forget = 0; see ``sga_jax.eval.muse``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import logprobs
from sga_jax.data.batching import iterate_batches
from sga_jax.data.formatting import Encoded, PromptFormatter
from sga_jax.errors import ConfigError, DataError
from sga_jax.eval.scoring import iterate_token_logprobs, summed_nll

_EPS = 1e-12


def _k_count(n: int, k: float) -> int:
    if not 0.0 < k <= 1.0:
        raise ConfigError(f"k must be in (0, 1], got {k}")
    return max(1, int(n * k))


def loss_score(logp: np.ndarray) -> float:
    """``mean_t logp_t``."""
    return float(np.mean(logp))


def zlib_score(logp: np.ndarray, text: str) -> float:
    """``mean_t logp_t / len(zlib.compress(text.encode()))``."""
    return float(np.mean(logp)) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(logp: np.ndarray, k: float = 0.2) -> float:
    """Mean of the ``max(1, int(k·n))`` lowest token log-probs."""
    logp = np.asarray(logp, np.float64)
    return float(np.mean(np.sort(logp)[: _k_count(logp.size, k)]))


def min_k_pp_score(logp: np.ndarray, mu: np.ndarray, sigma: np.ndarray, k: float = 0.2) -> float:
    """Min-K% over the standardised log-probs ``(logp − mu) / sigma``."""
    z = (np.asarray(logp, np.float64) - mu) / np.maximum(np.asarray(sigma, np.float64), _EPS)
    return float(np.mean(np.sort(z)[: _k_count(z.size, k)]))


def reference_score(nll: float, reference_nll: float) -> float:
    """``reference_nll − nll``: open-unlearning ``mia/reference.py`` line 25 scores
    ``target_loss − ref_loss`` (token-mean NLLs, ``evaluate_probability``) with members labelled 0;
    negated here so that higher = member."""
    return float(reference_nll) - float(nll)


def reference_scores(
    model: Any, reference_model: Any, rows: Sequence[Encoded], *, pad_id: int, batch_size: int = 8
) -> np.ndarray:
    """:func:`reference_score` per row: the token-mean NLL over the row's targets under the reference
    model minus that under ``model`` (both share the tokenizer the rows were encoded with)."""
    nll = {}
    for name, m in (("model", model), ("reference", reference_model)):
        total, count = summed_nll(m, rows, pad_id=pad_id, batch_size=batch_size)
        nll[name] = total / np.maximum(count, 1)
    return nll["reference"] - nll["model"]


def mean_param_norm(grads: Any, p: float = 2) -> jax.Array:
    """``mean_θ ‖g_θ‖_p`` over the leaves (parameter tensors) of a gradient pytree, each flattened:
    open-unlearning ``mia/gradnorm.py`` lines 29-32 (``param.grad.norm(p)`` per parameter, then
    ``torch.stack(...).mean()``). ``p`` in 1, 2, inf (their ``setup``, line 15)."""
    if p not in (1, 2, float("inf")):
        raise ConfigError(f"gradnorm p must be 1, 2 or inf, got {p}")
    norms = []
    for g in jax.tree.leaves(grads):
        a = jnp.abs(g.astype(jnp.float32)).ravel()
        norms.append(jnp.max(a) if p == float("inf") else jnp.sum(a) if p == 1 else jnp.sqrt(jnp.sum(a * a)))
    return jnp.mean(jnp.stack(norms))


@nnx.jit(static_argnames=("p",))
def _grad_norm(model, input_ids, attention_mask, loss_mask, *, p: float):
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask * attention_mask,
    }
    grads = nnx.grad(lambda m: jnp.sum(logprobs.sequence_nll(m, batch)))(model)
    return mean_param_norm(grads, p)


def gradnorm_scores(model: Any, rows: Sequence[Encoded], *, pad_id: int, p: float = 2) -> np.ndarray:
    """``−mean_θ ‖∇_θ NLL(row)‖_p`` per row (higher = member), NLL the token mean over the row's
    targets, one row at a time (open-unlearning runs gradnorm with ``batch_size: 1``,
    ``configs/eval/tofu_metrics/mia_gradnorm.yaml``). Their per-parameter norm is per tensor: a
    model with scanned (stacked) layers counts one tensor per stack, so load it with
    ``scan_layers=False`` for their numbers."""
    logprobs.check_positions(model, max((len(r) for r in rows), default=0), "sequences", "lower max_length")
    out = np.zeros(len(rows), np.float64)
    for idx, batch in iterate_batches(rows, 1, pad_id=pad_id, bucket=32, sort_by_length=True):
        arrays = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
        out[idx[0]] = -float(_grad_norm(model, *arrays, p=p))
    return out


def text_gradnorm_scores(
    model: Any, tokenizer: Any, texts: Sequence[str], *, p: float = 2, max_length: int = 512
) -> np.ndarray:
    """:func:`gradnorm_scores` of texts, encoded as :func:`text_scores` encodes them (every token
    after BOS a target). open-unlearning's ``tokenwise_logprobs`` leaves out the last labelled
    token, the EOS its rows end with; these texts have no EOS, so all their tokens count."""
    fmt = PromptFormatter(tokenizer, template="plain", max_length=max_length)
    encoded, _ = fmt.encode_rows([{"text": t} for t in texts], source="mia texts", strict=True)
    return gradnorm_scores(model, encoded, pad_id=fmt.pad_token_id, p=p)


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of separating members (label 1) from non-members by score (sklearn)."""
    from sklearn.metrics import roc_auc_score

    m, n = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    if m.size == 0 or n.size == 0:
        raise ConfigError("auc needs at least one member and one non-member score")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):  # a NaN model: sklearn raises a bare ValueError
        raise DataError("membership scores are not finite (NaN or inf): the model's outputs are broken")
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    return float(roc_auc_score(labels, np.concatenate([m, n])))


SCORES = ("loss", "zlib", "min_k", "min_k_pp")


def text_scores(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    k: float = 0.2,
    max_length: int = 512,
    batch_size: int = 8,
    which: Sequence[str] = SCORES,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, np.ndarray]:
    """Each requested score (``SCORES``) for each text (truncated to ``max_length`` tokens; the
    number truncated is reported by a warning), plus ``"nll"`` (token-mean NLL) and ``"n_tokens"``.
    ``progress(n)`` is called as texts are scored (e.g. a tqdm bar's ``update``)."""
    unknown = set(which) - set(SCORES)
    if unknown:
        raise ConfigError(f"unknown MIA score(s) {sorted(unknown)}; choose from {SCORES}")
    fmt = PromptFormatter(tokenizer, template="plain", max_length=max_length)
    encoded, _ = fmt.encode_rows([{"text": t} for t in texts], source="mia texts", strict=True)
    stats = "min_k_pp" in which
    out = {name: np.zeros(len(texts)) for name in (*which, "nll", "n_tokens")}
    for i, arrays in iterate_token_logprobs(
        model, encoded, pad_id=fmt.pad_token_id, batch_size=batch_size, stats=stats
    ):
        logp = arrays[0].astype(np.float64)
        out["nll"][i] = -np.mean(logp)
        out["n_tokens"][i] = logp.size
        if progress is not None:
            progress(1)
        if "loss" in which:
            out["loss"][i] = loss_score(logp)
        if "zlib" in which:
            out["zlib"][i] = zlib_score(logp, texts[i])
        if "min_k" in which:
            out["min_k"][i] = min_k_score(logp, k)
        if stats:
            out["min_k_pp"][i] = min_k_pp_score(logp, arrays[1], arrays[2], k)
    return out


def perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 512, batch_size: int = 8
) -> float:
    """Token-weighted perplexity of a text set: ``exp(Σ NLL / Σ tokens)`` over all texts."""
    s = text_scores(model, tokenizer, texts, max_length=max_length, batch_size=batch_size, which=())
    return float(np.exp(np.sum(s["nll"] * s["n_tokens"]) / np.sum(s["n_tokens"])))
