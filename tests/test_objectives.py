"""sga_jax.objectives against the formulas of docs/design.md written out in numpy / scipy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit, lambertw

from sga_jax import objectives as O
from sga_jax.errors import ConfigError

RNG = np.random.default_rng(0)
NLL_F = RNG.uniform(0.5, 3.0, size=6).astype(np.float32)
NLL_N = RNG.uniform(0.5, 3.0, size=(6, 3)).astype(np.float32)


@pytest.mark.parametrize("r", [0.0, -0.8, -4.0, 0.5, 1.0])
def test_sga_loss_formula(r, strict_dtypes):
    k = NLL_N.shape[1] + 1
    expected = np.mean(-(1 - r * (k - 1) / k) * NLL_F - (r / k) * NLL_N.sum(1))
    np.testing.assert_allclose(O.sga_loss(jnp.asarray(NLL_F), jnp.asarray(NLL_N), r), expected, rtol=1e-6)


def test_sga_r0_is_ga_and_paper_weights():
    assert float(O.sga_loss(NLL_F, NLL_N, 0.0)) == float(O.ga_loss(NLL_F))
    assert O.sga_direction_weights(-0.8, 4) == pytest.approx((1.6, -0.2))
    # K = 1: no normal samples, plain GA whatever r is.
    np.testing.assert_allclose(O.sga_loss(NLL_F, np.zeros((6, 0), np.float32), -0.8), O.ga_loss(NLL_F))


def test_sga_validation():
    with pytest.raises(ConfigError, match="r must be <= 1"):
        O.sga_loss(NLL_F, NLL_N, 1.5)
    with pytest.raises(ConfigError, match="nll_normal must be"):
        O.sga_loss(NLL_F, NLL_N[:4], -0.8)
    with pytest.raises(ConfigError, match="nll_normal must be"):
        O.sga_loss(NLL_F, NLL_N[:, 0], -0.8)
    with pytest.raises(ConfigError, match="K"):
        O.sga_direction_weights(-0.8, 0)
    # r traced (e.g. a schedule inside jit) is accepted; the check runs on concrete values only.
    jax.jit(O.sga_loss)(NLL_F, NLL_N, jnp.float32(-0.8))


def test_npo_and_simnpo_formulas():
    ref = NLL_F + RNG.normal(0, 0.3, size=6).astype(np.float32)
    beta = 0.1
    expected = -(2 / beta) * np.mean(np.log(expit(beta * (NLL_F - ref))))
    np.testing.assert_allclose(O.npo_loss(NLL_F, ref, beta=beta), expected, rtol=1e-5)
    # The reference NLL is a constant: no gradient flows into it.
    assert float(jnp.abs(jax.grad(lambda r: O.npo_loss(NLL_F, r))(jnp.asarray(ref))).sum()) == 0.0
    # SimNPO as open-unlearning's simnpo.py: gamma_OU·(-(2/β)·mean log σ(β·(l̄ - delta_OU))); here
    # our gamma = its delta (the margin) and our forget_weight = its gamma.
    b, margin, w = 4.5, 0.3, 0.125
    expected = w * -(2 / b) * np.mean(np.log(expit(b * (NLL_F - margin))))
    ours = O.simnpo_loss(NLL_F, beta=b, gamma=margin, forget_weight=w)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    with pytest.raises(ConfigError, match="same shape"):
        O.npo_loss(NLL_F, ref[:3])


def test_graddiff_and_nll():
    nll_r = NLL_N[:, 0]
    np.testing.assert_allclose(
        O.graddiff_loss(NLL_F, nll_r, alpha=0.5), -NLL_F.mean() + 0.5 * nll_r.mean(), rtol=1e-6
    )
    np.testing.assert_allclose(O.nll_loss(nll_r), nll_r.mean(), rtol=1e-6)


# f-GAN Table 2 (arXiv 1606.00709) in numpy: activation g and conjugate f*.
def _w(x):
    return np.real(lambertw(x))


FGAN = {
    "kl": (lambda v: v, lambda t: np.exp(t - 1)),
    "reverse_kl": (lambda v: -np.exp(-v), lambda t: -1 - np.log(-t)),
    "pearson": (lambda v: v, lambda t: t * t / 4 + t),
    "neyman": (lambda v: 1 - np.exp(-v), lambda t: 2 - 2 * np.sqrt(1 - t)),
    "squared_hellinger": (lambda v: 1 - np.exp(-v), lambda t: t / (1 - t)),
    "jeffrey": (lambda v: v, lambda t: _w(np.exp(1 - t)) + 1 / _w(np.exp(1 - t)) + t - 2),
    "js": (lambda v: np.log(2) - np.log1p(np.exp(-v)), lambda t: -np.log(2 - np.exp(t))),
    "total_variation": (lambda v: 0.5 * np.tanh(v), lambda t: t),
}


def _tokens():
    lp_f = np.log(RNG.uniform(0.05, 0.95, size=(4, 7))).astype(np.float32)
    lp_e = np.log(RNG.uniform(0.05, 0.95, size=(4, 5))).astype(np.float32)
    m_f = np.ones((4, 7), bool)
    m_f[0, 4:] = False
    m_f[2, :2] = False
    m_e = np.ones((4, 5), bool)
    m_e[1, 3:] = False
    return lp_f, m_f, lp_e, m_e


@pytest.mark.parametrize("div", sorted(FGAN))
def test_flat_loss_matches_fgan_table(div):
    lp_f, m_f, lp_e, m_e = _tokens()
    p_f = np.array([np.exp(lp_f[i][m_f[i]]).mean() for i in range(4)], np.float64)
    p_e = np.array([np.exp(lp_e[i][m_e[i]]).mean() for i in range(4)], np.float64)
    g, fstar = FGAN[div]
    expected = np.mean(-g(p_e) + fstar(g(p_f)))
    out = O.flat_loss(lp_f, m_f, lp_e, m_e, divergence=div)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=1e-6)
    # Minimising FLAT raises the template's probability and lowers the forget answer's.
    gf, ge = jax.grad(lambda a, b: O.flat_loss(a, m_f, b, m_e, divergence=div), (0, 1))(lp_f, lp_e)
    assert np.all(np.asarray(gf)[m_f] > 0) and np.all(np.asarray(ge)[m_e] < 0)
    assert np.all(np.asarray(gf)[~m_f] == 0)


def test_flat_validation():
    lp_f, m_f, lp_e, m_e = _tokens()
    with pytest.raises(ConfigError, match="js, kl, neyman, pearson, reverse_kl"):
        O.flat_loss(lp_f, m_f, lp_e, m_e, divergence="wasserstein")
    empty = m_f.copy()
    empty[3] = False
    with pytest.raises(ConfigError, match=r"empty loss mask in rows \[3\]"):
        O.flat_loss(lp_f, empty, lp_e, m_e)
    with pytest.raises(ConfigError, match="must both be"):
        O.flat_loss(lp_f, m_f[:, :3], lp_e, m_e)
    with pytest.raises(ConfigError, match="same number of rows"):
        O.flat_loss(lp_f, m_f, lp_e[:2], m_e[:2])
    assert O.flat_divergence("Jensen-Shannon") is O.flat_divergence("js")
