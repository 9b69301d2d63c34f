"""The ``sga`` and ``gru`` optax transforms: exact against jax.grad / closed forms on random trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sga_jax import objectives as O
from sga_jax.errors import ConfigError
from sga_jax.transforms.gru import GRUState, gru
from sga_jax.transforms.sga import SGAState, sga

B, K = 3, 4


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(5, 4)).astype(np.float32)),
        "layer": {"b": jnp.asarray(rng.normal(size=(4,)).astype(np.float32)), "s": jnp.float32(0.7)},
    }


def _data(seed=1):
    rng = np.random.default_rng(seed)
    xf = rng.normal(size=(B, 5)).astype(np.float32)
    xn = rng.normal(size=(B, K - 1, 5)).astype(np.float32)
    return jnp.asarray(xf), jnp.asarray(xn)


def _nll(p, x):
    """A smooth per-example 'NLL' of a tiny nonlinear model (a stand-in for token-mean NLL)."""
    h = jnp.tanh(x @ p["w"] + p["layer"]["b"][(None,) * (x.ndim - 1)])
    return jax.nn.logsumexp(p["layer"]["s"] * h, axis=-1) - p["layer"]["s"] * h[..., 0]


def _grads(p, xf, xn):
    g_f = jax.grad(lambda q: jnp.mean(_nll(q, xf)))(p)
    g_n = jax.grad(lambda q: jnp.mean(_nll(q, xn)))(p)  # mean over the batch and the K-1 samples
    return g_f, g_n


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("r", [0.0, -0.8, -4.0, 0.5, 1.0])
def test_fixed_r_equals_grad_of_sga_loss(r):
    p = _params()
    xf, xn = _data()
    g_f, g_n = _grads(p, xf, xn)
    tx = sga(r=r, K=K)
    d, state = jax.jit(tx.update)(g_f, tx.init(p), p, normal_grads=g_n)
    expected = jax.grad(lambda q: O.sga_loss(_nll(q, xf), _nll(q, xn), r))(p)
    np.testing.assert_allclose(_flat(d), _flat(expected), rtol=1e-5, atol=1e-6)
    assert isinstance(state, SGAState) and float(state.r) == pytest.approx(r) and int(state.count) == 1
    if r == 0.0:  # r = 0 is exactly gradient ascent
        np.testing.assert_allclose(_flat(d), -_flat(g_f), rtol=0, atol=0)


def test_k1_is_gradient_ascent():
    p = _params()
    xf, _ = _data()
    g_f = jax.grad(lambda q: jnp.mean(_nll(q, xf)))(p)
    tx = sga(r=-0.8, K=1)
    d, _ = tx.update(g_f, tx.init(p), p)
    np.testing.assert_allclose(_flat(d), -_flat(g_f), rtol=1e-7)


def _direction(g_f, g_n, r):
    u = (K - 1) / K * g_n - (1 - 1 / K) * g_f
    return -g_f - r * u, u


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_norm_rate_is_closed_form_and_minimises_step_norm(seed):
    rng = np.random.default_rng(seed)
    p = _params(seed)
    g_f = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x)).astype(np.float32)), p)
    g_n = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x)).astype(np.float32)), p)
    tx = sga(r=-0.8, K=K, rate="min_norm", r_min=-50.0, r_max=1.0)
    d, state = jax.jit(tx.update)(g_f, tx.init(p), p, normal_grads=g_n)

    gf, gn = _flat(g_f), _flat(g_n)
    _, u = _direction(gf, gn, 0.0)
    r_star = float(np.clip(-(gf @ u) / (u @ u), -50.0, 1.0))
    assert float(state.r) == pytest.approx(r_star, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(_flat(d), _direction(gf, gn, r_star)[0], rtol=1e-5, atol=1e-6)
    grid = np.linspace(-50.0, 1.0, 5001)
    norms = [np.linalg.norm(_direction(gf, gn, r)[0]) for r in grid]
    assert np.linalg.norm(_flat(d)) <= min(norms) + 1e-6
    assert abs(grid[int(np.argmin(norms))] - r_star) <= grid[1] - grid[0]


@pytest.mark.parametrize("rate", ["paper", "min_norm"])
def test_per_step_rate_is_clipped(rate):
    p = _params()
    g_f = jax.tree.map(jnp.ones_like, p)
    # g_n = -3·g_f: u = -(9/4 + 3/4)·g_f = -3·g_f, so paper r* = -1/3 and min_norm r* = +1/3.
    g_n = jax.tree.map(lambda x: -3.0 * x, g_f)
    tx = sga(K=K, rate=rate, r_min=-0.25, r_max=0.25, fallback="clip")
    _, state = tx.update(g_f, tx.init(p), p, normal_grads=g_n)
    assert float(state.r) == pytest.approx(-0.25 if rate == "paper" else 0.25)
    assert float(state.r_star) == pytest.approx(-1 / 3 if rate == "paper" else 1 / 3, rel=1e-5)
    assert int(state.out_of_range) == 1


def test_schedule_rate_and_logging():
    p = _params()
    xf, xn = _data()
    g_f, g_n = _grads(p, xf, xn)
    tx = sga(K=K, rate=optax.linear_schedule(0.0, -1.0, 4))
    state = tx.init(p)
    seen = []
    for _ in range(3):
        _, state = tx.update(g_f, state, p, normal_grads=g_n)
        seen.append(float(state.r))
    assert seen == pytest.approx([0.0, -0.25, -0.5])


def test_sga_validation():
    for kwargs, match in [
        (dict(r=1.5), "r must be <= 1"),
        (dict(K=0), "K"),
        (dict(rate="best"), "rate"),
        (dict(r_max=2.0), "r_max"),
        (dict(r_min=0.5, r_max=0.0), "r_min"),
    ]:
        with pytest.raises(ConfigError, match=match):
            sga(**kwargs)
    p = _params()
    tx = sga(K=4)
    with pytest.raises(ConfigError, match="normal_grads"):
        tx.update(p, tx.init(p), p)


def _random_tree(p, rng):
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x)).astype(np.float32)), p)


def test_gru_rectifies_conflicts_and_leaves_agreement_alone():
    rng = np.random.default_rng(3)
    p = _params()
    tx = gru(m=0.8)
    update = jax.jit(tx.update)
    conflicts = agreements = 0
    for _ in range(12):
        g, g_r = _random_tree(p, rng), _random_tree(p, rng)
        state = tx.init(p)
        out, state = update(g, state, p, retain_grads=g_r)
        a, r_ = _flat(out), _flat(g_r)  # first step: EMA = 0.8·retain grad (same direction)
        if _flat(g) @ r_ < 0:
            conflicts += 1
            assert bool(state.rectified)
            assert a @ r_ >= -1e-6 * np.linalg.norm(a) * np.linalg.norm(r_)
            # The projection removes exactly the g_r component: out = g - (⟨g,g_r⟩/‖g_r‖²)·g_r.
            expected = _flat(g) - (_flat(g) @ r_) / (r_ @ r_) * r_
            np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)
        else:
            agreements += 1
            assert not bool(state.rectified)
            np.testing.assert_array_equal(a, _flat(g))
    assert conflicts and agreements


def test_gru_ema_and_clip():
    rng = np.random.default_rng(4)
    p = _params()
    tx = gru(m=0.8, clip=0.5)
    g1, g2, g = _random_tree(p, rng), _random_tree(p, rng), _random_tree(p, rng)
    state = tx.init(p)
    _, state = tx.update(g, state, p, retain_grads=g1)
    out, state = tx.update(g, state, p, retain_grads=g2)
    assert isinstance(state, GRUState) and int(state.count) == 2
    # The EMA starts at 0 (official GRU): 0.8·g1, then 0.8·g2 + 0.2·(0.8·g1).
    np.testing.assert_allclose(_flat(state.retain_ema), 0.8 * _flat(g2) + 0.2 * 0.8 * _flat(g1), rtol=1e-6)
    assert np.linalg.norm(_flat(out)) <= 0.5 + 1e-5
    with pytest.raises(ConfigError, match="momentum"):
        gru(m=0.0)
    with pytest.raises(ConfigError, match="retain_grads"):
        tx.update(g, state, p)


def test_chain_sga_gru_adamw_under_jit():
    """optax.chain(sga, gru, adamw): extra args reach their transform, the others are ignored."""
    p = _params()
    xf, xn = _data()
    g_f, g_n = _grads(p, xf, xn)
    g_r = jax.grad(lambda q: jnp.mean(_nll(q, xn[:, 0] + 1.0)))(p)
    tx = optax.chain(sga(r=-0.8, K=K), gru(m=0.8), optax.adamw(1e-2))
    state = tx.init(p)

    @jax.jit
    def step(p, state):
        up, state = tx.update(g_f, state, p, normal_grads=g_n, retain_grads=g_r, unrelated=1.0)
        return optax.apply_updates(p, up), state

    p2, state = step(p, state)
    assert float(state[0].r) == pytest.approx(-0.8)
    assert int(state[1].count) == 1
    assert np.all(np.isfinite(_flat(p2))) and not np.allclose(_flat(p2), _flat(p))


def test_public_lazy_exports_are_the_factories():
    """``sga_jax.transforms.sga`` must be the factory, not the submodule of the same name."""
    import sga_jax

    assert sga_jax.transforms.sga is sga and sga_jax.transforms.SGAState is SGAState
    assert sga_jax.transforms.gru is gru and sga_jax.transforms.GRUState is GRUState
