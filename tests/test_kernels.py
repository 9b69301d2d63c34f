"""sga_jax.kernels.token_logprobs: the chunked kernel against the plain-JAX reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sga_jax import kernels
from sga_jax.errors import ConfigError


def _inputs(n=37, d=16, v=1000, dtype=jnp.float32, seed=0, bias=True):
    # numpy inputs: no eager JAX op (each would compile) before the functions under test.
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32), dtype)
    w = jnp.asarray(0.5 * rng.normal(size=(d, v)).astype(np.float32), dtype)
    b = jnp.asarray(rng.normal(size=(v,)).astype(np.float32), dtype) if bias else None
    y = rng.integers(0, v, size=n).astype(np.int32)
    y[[0, 5, n - 1]] = -100  # padding / prompt rows
    return h, w, jnp.asarray(y), b


def _loss(impl, y, **kw):
    # A non-uniform cotangent, so a transposition or sign slip cannot cancel out.
    def f(h, w, b):
        lp = kernels.token_logprobs(h, w, y, b, implementation=impl, **kw)
        return jnp.sum(jnp.linspace(0.5, 2.0, lp.shape[0]) * lp)

    return f


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize(
    "kw, bias",
    [
        (dict(chunk_size=128), True),  # V = 1000 is not a multiple of 128
        (dict(chunk_size=4096), False),  # one chunk larger than V
        (dict(chunk_size=96, token_chunk_size=8), True),  # N = 37 not a multiple of 8 either
    ],
)
def test_chunked_matches_reference_float32(kw, bias, strict_dtypes):
    h, w, y, b = _inputs(bias=bias)
    ref = kernels.token_logprobs(h, w, y, b, implementation="reference")
    out = jax.jit(lambda h, w, b: kernels.token_logprobs(h, w, y, b, **kw))(h, w, b)
    assert out.dtype == jnp.float32 and out.shape == y.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert float(np.min(ref)) < -3.0  # not a degenerate near-uniform test

    argnums = (0, 1, 2) if bias else (0, 1)
    g_ref = jax.jit(jax.grad(_loss("reference", y), argnums))(h, w, b)
    g_out = jax.jit(jax.grad(_loss("chunked", y, **kw), argnums))(h, w, b)
    for a, r in zip(g_out, g_ref):
        assert a.shape == r.shape and a.dtype == r.dtype
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(r))))


def test_ignored_rows_have_no_value_and_no_gradient():
    h, w, y, b = _inputs()
    ignored = np.asarray(y) < 0
    f = lambda h: jnp.sum(kernels.token_logprobs(h, w, y, b, chunk_size=128))
    out = jax.jit(lambda h: kernels.token_logprobs(h, w, y, b, chunk_size=128))(h)
    assert np.all(np.asarray(out)[ignored] == 0.0)
    assert np.all(np.asarray(out)[~ignored] < 0.0)
    dh = jax.jit(jax.grad(f))(h)
    assert np.all(np.asarray(dh)[ignored] == 0.0)
    assert np.all(np.abs(np.asarray(dh)[~ignored]).sum(axis=1) > 0)


def test_chunked_bfloat16_within_1e2():
    h, w, y, b = _inputs(dtype=jnp.bfloat16, v=777)
    f32 = [jnp.asarray(np.asarray(x, np.float32)) for x in (h, w, b)]
    ref = jax.jit(lambda h, w, b: kernels.token_logprobs(h, w, y, b, implementation="reference"))(*f32)
    out = jax.jit(lambda h, w, b: kernels.token_logprobs(h, w, y, b, chunk_size=128))(h, w, b)
    valid = np.asarray(y) >= 0
    assert _rel(np.asarray(out)[valid], np.asarray(ref)[valid]) < 1e-2
    g_ref = jax.jit(jax.grad(_loss("reference", y), (0, 1, 2)))(*f32)
    g_out = jax.jit(jax.grad(_loss("chunked", y, chunk_size=128), (0, 1, 2)))(h, w, b)
    for a, r in zip(g_out, g_ref):
        assert a.dtype == jnp.bfloat16
        assert _rel(a, r) < 1e-2


def test_chunked_never_materialises_full_logits():
    """Compiled temp memory of loss + gradient: the chunked path stays far below N·V·4 bytes."""
    n, d, v, chunk = 512, 32, 16384, 1024
    h, w, y, b = _inputs(n=n, d=d, v=v, bias=False)

    def temp(impl, **kw):
        f = jax.jit(jax.value_and_grad(_loss(impl, y, **kw), (0, 1)))
        return f.lower(h, w, None).compile().memory_analysis().temp_size_in_bytes

    full_logits = n * v * 4
    ref = temp("reference")
    chunked = temp("chunked", chunk_size=chunk)
    assert ref >= full_logits
    assert chunked < full_logits / 4, (chunked, ref)


def test_bad_arguments_raise_config_error():
    h, w, y, b = _inputs()
    with pytest.raises(ConfigError, match="reference, chunked"):
        kernels.token_logprobs(h, w, y, b, implementation="pallas-typo")
    with pytest.raises(ConfigError, match="do not fit"):
        kernels.token_logprobs(h[:, :-1], w, y, b)
    with pytest.raises(ConfigError, match="labels must be integers"):
        kernels.token_logprobs(h, w, y.astype(jnp.float32), b)
    with pytest.raises(ConfigError, match="bias"):
        kernels.token_logprobs(h, w, y, b[:-1])


@pytest.mark.parametrize("kw", [dict(chunk_size=128), dict(chunk_size=96, token_chunk_size=8)])
def test_softcap_matches_capped_log_softmax(kw, strict_dtypes):
    """Gemma 2's final soft-cap: chunked (value and gradient, through the custom backward pass) ==
    log_softmax(cap · tanh(z / cap)) written here directly; the cap changes the result."""
    h, w, y, b = _inputs()
    cap = 2.0  # |z| reaches ~10 on these inputs: the cap bites

    def direct(h, w, b):
        z = cap * jnp.tanh((h @ w + b[None, :]) / cap)
        lp = jax.nn.log_softmax(z, axis=-1)
        picked = jnp.take_along_axis(lp, jnp.maximum(y, 0)[:, None], axis=1)[:, 0]
        return jnp.where(y >= 0, picked, 0.0)

    out = jax.jit(lambda h, w, b: kernels.token_logprobs(h, w, y, b, softcap=cap, **kw))(h, w, b)
    want = direct(h, w, b)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    uncapped = kernels.token_logprobs(h, w, y, b, implementation="reference")
    assert float(jnp.max(jnp.abs(uncapped - want))) > 1.0
    ref = kernels.token_logprobs(h, w, y, b, implementation="reference", softcap=cap)
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)

    def direct_loss(h, w, b):
        lp = direct(h, w, b)
        return jnp.sum(jnp.linspace(0.5, 2.0, lp.shape[0]) * lp)

    g_want = jax.jit(jax.grad(direct_loss, (0, 1, 2)))(h, w, b)
    g_out = jax.jit(jax.grad(_loss("chunked", y, softcap=cap, **kw), (0, 1, 2)))(h, w, b)
    for a, r in zip(g_out, g_want):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(r))))
