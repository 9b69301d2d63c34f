"""Membership-inference scores on constructed log-probs, AUC vs sklearn / the rank formula."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy.stats import rankdata

from sga_jax.errors import ConfigError
from sga_jax.eval import mia

LOGP = np.log(np.array([0.5, 0.1, 0.25, 0.05, 0.8]))


def test_scores_by_hand():
    assert mia.loss_score(LOGP) == pytest.approx(np.log([0.5, 0.1, 0.25, 0.05, 0.8]).sum() / 5)
    # k = 0.4 of 5 tokens -> the 2 lowest: 0.05 and 0.1
    assert mia.min_k_score(LOGP, 0.4) == pytest.approx((np.log(0.05) + np.log(0.1)) / 2)
    assert mia.min_k_score(LOGP, 0.1) == pytest.approx(np.log(0.05))  # at least one token
    text = "hello hello hello"
    assert mia.zlib_score(LOGP, text) == pytest.approx(LOGP.mean() / len(zlib.compress(text.encode())))
    mu, sigma = np.full(5, -2.0), np.array([1.0, 2.0, 0.5, 1.0, 4.0])
    z = (LOGP - mu) / sigma
    assert mia.min_k_pp_score(LOGP, mu, sigma, 0.4) == pytest.approx(np.sort(z)[:2].mean())
    with pytest.raises(ConfigError):
        mia.min_k_score(LOGP, 0.0)


def test_min_k_pp_stats_are_the_distribution_moments():
    """mu, sigma from scoring's jitted log-softmax equal E_p[log p], Std_p[log p] computed in numpy."""
    import jax.numpy as jnp

    logits = np.random.default_rng(0).normal(size=(3, 7))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(logp)
    mu = (p * logp).sum(-1)
    sd = np.sqrt((p * (logp - mu[:, None]) ** 2).sum(-1))

    class Fixed:  # the scoring function only calls model(ids, mask)
        def __call__(self, ids, mask):
            return jnp.asarray(np.concatenate([logits, logits[:1]])[None], jnp.float32)

    from sga_jax.eval.scoring import _token_logprobs

    ids = jnp.asarray([[0, 1, 2, 3]], jnp.int32)
    ones = jnp.ones((1, 4), jnp.int32)
    got_logp, _, got_mu, got_sd = _token_logprobs.__wrapped__(Fixed(), ids, ones, ones, stats=True)
    np.testing.assert_allclose(np.asarray(got_mu)[0], mu, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_sd)[0], sd, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_logp)[0], logp[[0, 1, 2], [1, 2, 3]], rtol=1e-5)


def test_auc_vs_sklearn_and_rank_formula():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    members, non = rng.normal(0.3, 1, 57), rng.normal(0, 1, 43)
    members[:5] = non[:5]  # ties
    got = mia.auc(members, non)
    y = np.r_[np.ones(57), np.zeros(43)]
    assert got == pytest.approx(roc_auc_score(y, np.r_[members, non]))
    ranks = rankdata(np.r_[members, non])  # Mann-Whitney U / (n1 n0), average ranks for ties
    assert got == pytest.approx((ranks[:57].sum() - 57 * 58 / 2) / (57 * 43))
    assert mia.auc([2, 3], [0, 1]) == 1.0 and mia.auc([0, 1], [2, 3]) == 0.0
