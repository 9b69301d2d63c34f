"""SGA's two per-step rates, GRU's EMA start, FLAT's official default divergence and template
sampling, SGA normal samples (file; forget rows never returned) and K-FADE's last forget rows,
each against a reference written here from the paper / official code (issue 13)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sga_jax import config as C
from sga_jax import methods, train
from sga_jax import objectives as O
from sga_jax.data import normal_samples, splits
from sga_jax.errors import ConfigError, DataError
from sga_jax.transforms.gru import gru
from sga_jax.transforms.sga import sga

K = 4


def _vec(rng, n=7):
    return {"a": jnp.asarray(rng.normal(size=n).astype(np.float32))}


# ---------------------------------------------------------------------------------- SGA rates


@pytest.mark.parametrize("seed", range(5))
def test_paper_and_min_norm_rates_are_their_closed_forms(seed):
    """u = ((K-1)/K)·normal_grads - (1 - 1/K)·g_f; paper: r* = +<g_f,u>/|u|^2 (its printed formula);
    min_norm: r* = -<g_f,u>/|u|^2 (argmin_r |-g_f - r·u|). Unclipped here (wide bounds)."""
    rng = np.random.default_rng(seed)
    g_f, g_n = _vec(rng), _vec(rng)
    gf, gn = np.asarray(g_f["a"], np.float64), np.asarray(g_n["a"], np.float64)
    u = (K - 1) / K * gn - (1 - 1 / K) * gf
    for rate, expected in [("paper", gf @ u / (u @ u)), ("min_norm", -(gf @ u) / (u @ u))]:
        tx = sga(K=K, rate=rate, r_min=-1e6, r_max=1.0, fallback="clip")  # r <= 1 always (the loss range)
        d, state = tx.update(g_f, tx.init(g_f), normal_grads=g_n)
        expected = min(expected, 1.0)
        assert float(state.r) == pytest.approx(expected, rel=1e-4)
        np.testing.assert_allclose(np.asarray(d["a"]), -gf - expected * u, rtol=1e-4, atol=1e-5)
    # the min-norm rate minimises the step norm over a grid
    r_mn = -(gf @ u) / (u @ u)
    grid = np.linspace(r_mn - 3, r_mn + 3, 601)
    assert abs(grid[np.argmin([np.linalg.norm(-gf - r * u) for r in grid])] - r_mn) <= 0.01


def test_min_norm_is_positive_in_practice_and_default_clip_is_minus8_0():
    """With g_n independent of g_f, <g_f,u> ≈ -(1-1/K)|g_f|^2 < 0: min_norm's r* > 0 (it would
    ascend the normal samples) and the paper's r* < 0. The default clip [-8, 0] stops the former."""
    rng = np.random.default_rng(0)
    pos = 0
    for _ in range(50):
        g_f, g_n = _vec(rng, 64), _vec(rng, 64)
        _, st_mn = sga(K=K, rate="min_norm", r_max=1.0).update(g_f, sga(K=K).init(g_f), normal_grads=g_n)
        pos += float(st_mn.r) > 0
    assert pos >= 45
    # Exact clipped values: g_n = 0 gives u = -(3/4)·g_f, so paper r* = -4/3 and min_norm r* = +4/3.
    g_f = {"a": jnp.ones(5)}
    zero = {"a": jnp.zeros(5)}
    _, st = sga(K=K, rate="paper").update(g_f, sga(K=K).init(g_f), normal_grads=zero)
    assert float(st.r) == pytest.approx(-4 / 3, rel=1e-6)
    _, st = sga(K=K, rate="paper", r_min=-1.0).update(g_f, sga(K=K).init(g_f), normal_grads=zero)
    assert float(st.r) == -1.0
    d, st = sga(K=K, rate="min_norm", fallback="clip").update(g_f, sga(K=K).init(g_f), normal_grads=zero)
    assert float(st.r) == 0.0  # +4/3 clipped to r_max = 0: plain GA
    np.testing.assert_array_equal(np.asarray(d["a"]), -np.ones(5))


def test_paper_rate_above_r_max_takes_the_fallback_and_is_reported():
    """Step 1: g_n = 0, u = -(3/4)·g_f, paper r* = -4/3 (admissible). Step 2: g_n = 3·g_f, u =
    (9/4 - 3/4)·g_f = (3/2)·g_f, paper r* = +2/3 > r_max = 0 (normal gradients that exceed and align
    with the forget gradient, as after a few GA steps). The fallback decides step 2's r; the state
    keeps the unclipped r* and counts the step; the loop's warning names it."""
    g_f = {"a": jnp.ones(5)}
    steps = [{"a": jnp.zeros(5)}, {"a": 3.0 * jnp.ones(5)}]
    used = {}
    for fallback, expected in [("last", -4 / 3), ("fixed", -0.8), ("clip", 0.0)]:
        tx = sga(r=-0.8, K=K, rate="paper", fallback=fallback)
        st = tx.init(g_f)
        for g_n in steps:
            d, st = tx.update(g_f, st, normal_grads=g_n)
        used[fallback] = float(st.r)
        assert float(st.r) == pytest.approx(expected, rel=1e-6), fallback
        assert float(st.r_star) == pytest.approx(2 / 3, rel=1e-6) and int(st.out_of_range) == 1
        u = 1.5 * np.ones(5)  # d = -g_f - r·u with the r the fallback chose
        np.testing.assert_allclose(np.asarray(d["a"]), -1.0 - expected * u, rtol=1e-6)
    assert len(set(used.values())) == 3
    with pytest.raises(ConfigError, match="fallback"):
        sga(K=K, rate="paper", fallback="ga")
    from sga_jax.transforms.sga import warn_rate_range

    m = C.compose([], ["method=sga_paper_r"]).method
    assert m.fallback == "last"
    hist = [
        {"step": 1, "r": -4 / 3, "r_star": -4 / 3, "r_out": 0},
        {"step": 2, "r": -4 / 3, "r_star": 2 / 3, "r_out": 1},
    ]
    line = warn_rate_range(hist, m)
    assert "1 of 2 steps" in line and "+0.667" in line and "last r* in range" in line, line
    assert warn_rate_range(hist[:1], m) is None
    fixed = C.compose([], ["method=sga"]).method
    assert warn_rate_range(hist, fixed) is None  # a fixed r never leaves its range


def test_optimal_is_refused_naming_both():
    makers = (lambda: sga(K=K, rate="optimal"), lambda: C.compose([], ["method=sga", "method.rate=optimal"]))
    for make in makers:
        with pytest.raises(ConfigError, match="paper.*min_norm"):
            make()
    assert C.compose([], ["method=sga_paper_r"]).method.rate == "paper"
    m = C.compose([], ["method=sga_min_norm_r"]).method
    assert (m.rate, m.r_min, m.r_max) == ("min_norm", -8.0, 0.0)


# ------------------------------------------------------------------------------------------ GRU


def test_gru_ema_starts_at_zero_as_official():
    """tmlr-group/GRU dataloader_faster_refactor1.py l. 178, 516-517: old = 0; each step
    ema = m·g_t + (1-m)·old; old = ema. Sequence 0 -> m·g1 -> m·g2 + (1-m)·m·g1 -> ..."""
    rng = np.random.default_rng(1)
    m = 0.8
    tx = gru(m=m)
    state = tx.init({"a": jnp.zeros(6)})
    old = np.zeros(6)
    for _ in range(3):
        g_r = _vec(rng, 6)
        _, state = tx.update(_vec(rng, 6), state, retain_grads=g_r)
        old = m * np.asarray(g_r["a"], np.float64) + (1 - m) * old
        np.testing.assert_allclose(np.asarray(state.retain_ema["a"]), old, rtol=1e-6)


def test_gru_configs_do_not_clip():
    for base in ("ga", "npo", "sga", "flat"):
        cfg = C.compose([], [f"method=gru_{base}"])
        assert cfg.train.max_grad_norm is None and cfg.method.clip is None


# ----------------------------------------------------------------------------------------- FLAT


def test_flat_default_is_total_variation_as_official():
    """UCSC-REAL/FLAT dataloader.py l. 806-860: default div 'Total-Variation'; activation(x) =
    -mean(tanh(x)/2), conjugate(x) = -mean(tanh(x)/2); loss = activation(P_e) - conjugate(P_f)."""
    assert C.compose([], ["method=flat"]).method.divergence == "tv"
    assert C.FLATConfig().divergence == "tv"
    rng = np.random.default_rng(2)
    logp_f = jnp.asarray(np.log(rng.uniform(0.05, 0.9, size=(1, 6))).astype(np.float32))
    logp_e = jnp.asarray(np.log(rng.uniform(0.05, 0.9, size=(1, 5))).astype(np.float32))
    mask_f, mask_e = jnp.ones((1, 6), bool), jnp.ones((1, 5), bool)
    p_f, p_e = float(np.exp(logp_f).mean()), float(np.exp(logp_e).mean())
    official = -np.tanh(p_e) / 2 - (-np.tanh(p_f) / 2)
    assert float(O.flat_loss(logp_f, mask_f, logp_e, mask_e)) == pytest.approx(official, rel=1e-5)
    tv = O.flat_loss(logp_f, mask_f, logp_e, mask_e, divergence="tv")
    assert float(tv) == pytest.approx(official, rel=1e-5)


def _ids_batch(rows, t=4):
    ids = np.asarray(rows, np.int32).reshape(-1, t)
    ones = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def test_flat_template_per_row_per_epoch():
    """The official dataset draws a template in every __getitem__ (data_module.py l. 623-625): a row
    sees a fresh, uniformly drawn template each epoch. ``fixed`` keeps one per row."""
    n, templates = 6, [f"idk {i}" for i in range(10)]
    forget_rows = [{"question": f"q{i}", "answer": "a"} for i in range(n)]
    blocks, rows = splits.template_rows(forget_rows, templates, per_epoch=True, epochs=5, seed=0)
    assert blocks == 5 and len(rows) == 5 * n
    per_row = [{rows[e * n + i]["answer"] for e in range(5)} for i in range(n)]
    assert sum(len(s) > 1 for s in per_row) >= n - 1  # templates change across epochs
    assert all(rows[e * n + i]["question"] == f"q{i}" for e in range(5) for i in range(n))
    blocks1, fixed = splits.template_rows(forget_rows, templates, per_epoch=False, epochs=5, seed=0)
    assert blocks1 == 1 and len(fixed) == n
    # step_batch serves epoch e's block: token id = 100·block + row
    tmpl = _ids_batch([[100 * e + i] * 4 for e in range(5) for i in range(n)])
    data = train.TrainData(forget=_ids_batch([[i] * 4 for i in range(n)]), template=tmpl, template_epochs=5)
    for step in range(10):  # batch 3: epoch = step // 2
        b = train.step_batch(data, step, 3, 1, seed=0)
        f, t = b["forget"]["input_ids"][0][:, 0], b["template"]["input_ids"][0][:, 0]
        np.testing.assert_array_equal(t, 100 * (step // 2) + f)


# --------------------------------------------------------------------------- SGA normal samples


def test_normal_file_rows_and_errors(tmp_path):
    p = tmp_path / "normal.jsonl"
    p.write_text('{"texts": ["a", "b", "c"]}\n{"texts": ["d", "e", "f"]}\n')
    rows = splits.load_normal_file(str(p), 2, 3)
    assert [r["text"] for r in rows] == list("abcdef")
    with pytest.raises(DataError, match="one per forget row"):
        splits.load_normal_file(str(p), 3, 3)
    with pytest.raises(DataError, match="line 1 must be"):
        splits.load_normal_file(str(p), 2, 2)
    with pytest.raises(ConfigError, match="method.normal_file"):
        C.compose([], ["method=sga", "method.normal_samples=file"])
    cfg = C.compose([], ["method=sga", "method.normal_samples=file", f"method.normal_file={p}"]).method
    needs = methods.build_method(cfg).needs
    assert "normal" in needs and "retain" not in needs  # the file replaces retain retrieval
    # step_batch takes normal rows from data.normal when it is given
    data = train.TrainData(
        forget=_ids_batch([[1] * 4, [2] * 4]),
        normal=_ids_batch([[10 + j] * 4 for j in range(6)]),
        normal_index=np.arange(6).reshape(2, 3),
    )
    b = train.step_batch(data, 0, 2, 1, seed=0)
    f = b["forget"]["input_ids"][0][:, 0]
    got = b["normal"]["input_ids"][0][:, 0].reshape(2, 3)
    np.testing.assert_array_equal(got, 10 + 3 * (f[:, None] - 1) + np.arange(3))


def test_retrieval_never_returns_a_forget_row(tmp_path):
    """A retain pool that holds copies of the forget rows: embedding retrieval would pick each
    copy first (cosine 1); the runner passes their ids, so none is returned."""
    from tiny_models import write_tiny_hf

    import sga_jax

    path, _ = write_tiny_hf("llama", tmp_path / "m", seed=0)
    model = sga_jax.load_model(path)
    rng = np.random.default_rng(0)
    forget = _ids_batch(rng.integers(3, 96, size=(3, 8)), t=8)
    others = _ids_batch(rng.integers(3, 96, size=(6, 8)), t=8)
    pool = {k: np.concatenate([others[k][:3], forget[k], others[k][3:]]) for k in forget}
    assert normal_samples.forget_rows_in_pool(forget, pool) == [3, 4, 5]
    data = train.TrainData(forget=forget, retain=pool)
    for how in ("embedding", "random"):
        m = C.compose([], ["method=sga", f"method.normal_samples={how}"]).method
        idx = normal_samples.normal_index(model, data, m, seed=0)
        assert idx.shape == (3, 3) and not set(idx.ravel()) & {3, 4, 5}


# --------------------------------------------------------------------------------------- K-FADE


def test_kfade_keeps_the_last_partial_batch(tmp_path):
    """The uphill gradient is of the mean forget NLL over *every* row: batches of 4 + 1 rows give
    the same update as one batch of 5."""
    from tiny_models import write_tiny_hf

    import sga_jax
    from sga_jax import curvature as CV
    from sga_jax import kfade_driver as KD

    path, _ = write_tiny_hf("llama", tmp_path / "m", seed=1)
    model = sga_jax.load_model(path)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 96, size=(5, 10)).astype(np.int32)
    loss = np.zeros_like(ids)
    loss[:, 4:] = 1
    loss[4, 4:] = 0
    loss[4, 9] = 1  # the last row: one answer token, a very different mean NLL weight
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}
    split = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    eigen = CV.estimate_curvature(model, [full], fisher="sampled", key=0)
    kw = dict(curvature=eigen, retain_batches=[full], steps=1, trust_region=1e-2)
    _, d_one = KD.kfade_unlearn(model, [full], **kw)
    _, d_two = KD.kfade_unlearn(model, split, **kw)
    for a, b in zip(jax.tree.leaves(d_one), jax.tree.leaves(d_two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7)
