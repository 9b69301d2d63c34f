"""K-FADE transform, kfade_unlearn and Δθ save / re-apply on a tiny Llama (HF checkpoint written by
transformers; the re-applied checkpoint is checked with transformers itself)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sga_jax
from sga_jax import curvature as C
from sga_jax import kfac_math as M
from sga_jax import kfade_driver as KD
from sga_jax import output_space as O
from sga_jax import reapply as R
from sga_jax.errors import ConfigError, DivergenceError, ModelLoadError
from sga_jax.transforms import KFADEState, kfade
from tests.tiny_models import write_tiny_hf


def _batch(seed: int, b: int = 3, t: int = 10):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 96, size=(b, t)).astype(np.int32)
    attn = np.ones((b, t), np.int32)
    attn[-1, t - 3 :] = 0
    ids[attn == 0] = 0
    loss = np.zeros((b, t), np.int32)
    loss[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss * attn}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, _ = write_tiny_hf("llama", tmp_path_factory.mktemp("kfade") / "llama", seed=1)
    model = sga_jax.load_model(path, scan_layers=True)
    retain = [_batch(0), _batch(1)]
    forget = [_batch(2)]
    eigen = C.estimate_curvature(model, retain, fisher="sampled", key=0)
    factors = C.estimate_factors(model, retain, fisher="sampled", key=0)
    return path, model, retain, forget, eigen, factors


def _forget_grads(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return params, jax.grad(lambda p: KD.forget_nll(nnx.merge(graphdef, p, rest), batch))(params)


def _leaf(tree, key):
    node = tree
    for name in key.split("/"):
        node = node[name]
    return node


def test_transform_takes_a_trust_region_step(setup):
    _, model, _, forget, eigen, factors = setup
    params, grads = _forget_grads(model, forget[0])
    lam, delta = 1e-3, 1e-2
    tx = kfade(eigen, damping=lam, damping_mode="absolute", trust_region=delta)
    state = tx.init(params)
    assert isinstance(state, KFADEState) and set(state.eigen) == set(eigen)
    updates, state = jax.jit(tx.update)(grads, state, params)
    # ½ Δᵀ(F + λI)Δ = δ with F = A ⊗ G per layer, computed with the explicit operator
    quad = 0.0
    for k in factors.a:
        d = _leaf(updates, k)["kernel"]
        quad += float(jnp.sum(d * M.kron_matvec(factors.a[k], factors.g[k], d, lam)))
    np.testing.assert_allclose(0.5 * quad, delta, rtol=2e-3)
    # uphill: the update has a positive inner product with the forget gradient
    inner = sum(jnp.vdot(u, g) for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True))
    assert float(inner) > 0
    # parameters without curvature do not move (embeddings, norms)
    assert not np.any(np.asarray(updates["embed_tokens"]["embedding"]))
    assert not np.any(np.asarray(updates["norm"]["scale"]))
    assert int(state.count) == 1 and float(state.last_step_size) > 0
    # a loss to minimise (ascend=False) gives the same step with the gradient's sign flipped
    neg = jax.tree.map(jnp.negative, grads)
    tx2 = kfade(eigen, damping=lam, damping_mode="absolute", trust_region=delta, ascend=False)
    u2, _ = tx2.update(neg, tx2.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(u2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-8)
    # η is capped by max_step_size; it composes in an optax chain
    tx3 = optax.chain(optax.identity(), kfade(eigen, damping=lam, trust_region=delta, max_step_size=1e-9))
    u3, s3 = tx3.update(grads, tx3.init(params), params)
    assert float(s3[1].last_step_size) == pytest.approx(1e-9)


def test_relative_damping_is_per_block(setup):
    """damping_mode="relative": λ_k = factor · mean(λ_A λ_G) of block k (per stacked layer), and the
    step meets ½ Δᵀ(F + Λ)Δ = δ with those λ_k (explicit A ⊗ G operator per block and layer)."""
    _, model, _, forget, eigen, factors = setup
    params, grads = _forget_grads(model, forget[0])
    lam = M.block_damping(eigen, 0.1)
    for k, e in eigen.items():
        ref = 0.1 * np.mean(np.einsum("...i,...j->...ij", np.asarray(e.ea), np.asarray(e.eg)), axis=(-2, -1))
        np.testing.assert_allclose(np.asarray(lam[k])[..., 0, 0], ref, rtol=1e-5)
    assert len({float(np.asarray(v).ravel()[0]) for v in lam.values()}) == len(lam)  # not one shared λ
    delta = 1e-2
    tx = kfade(eigen, damping=0.1, trust_region=delta)  # relative is the default
    updates, _ = tx.update(grads, tx.init(params), params)
    quad = 0.0
    for k in factors.a:
        d = np.asarray(_leaf(updates, k)["kernel"])
        for layer in range(d.shape[0]):  # scanned: [L, in, out]
            lk = float(np.asarray(lam[k])[layer, 0, 0])
            av = M.kron_matvec(factors.a[k][layer], factors.g[k][layer], d[layer], lk)
            quad += float(jnp.sum(d[layer] * av))
    np.testing.assert_allclose(0.5 * quad, delta, rtol=2e-3)
    with pytest.raises(ConfigError, match="damping_mode"):
        kfade(eigen, damping_mode="adaptive")


def _explicit_gn(model, params, direction, batch, eps=1e-3):
    """dᵀGd per answer token, independently: the logit tangent by central finite differences, then
    the softmax Hessian diag(p) − ppᵀ as an explicit matrix, in float64."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def logits(p):
        m = nnx.merge(graphdef, p, rest)
        return np.asarray(
            m(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])), np.float64
        )

    shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)  # noqa: E731
    z = logits(params)[:, :-1]
    zdot = ((logits(shift(eps)) - logits(shift(-eps))) / (2 * eps))[:, :-1]
    mask = np.asarray(batch["loss_mask"])[:, 1:].astype(bool)
    total = 0.0
    for b, t in zip(*np.nonzero(mask)):
        p = np.exp(z[b, t] - z[b, t].max())
        p /= p.sum()
        h = np.diag(p) - np.outer(p, p)
        total += zdot[b, t] @ h @ zdot[b, t]
    return total / mask.sum()


def test_gauss_newton_quadratic_is_the_exact_output_curvature(setup):
    """output_space.gauss_newton_quadratic (one jvp) = the explicit softmax Gauss-Newton form of
    finite-difference logit tangents, and ½ η² dᵀGd is the real KL(θ ‖ θ + ηd) for a small η."""
    _, model, retain, _, _, _ = setup
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    direction = jax.tree.unflatten(tdef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    batch = retain[0]
    q = float(jax.jit(O.gauss_newton_quadratic, static_argnums=0)(graphdef, params, rest, direction, batch))
    np.testing.assert_allclose(q, _explicit_gn(model, params, direction, batch), rtol=1e-2)
    eta = 0.05
    moved = jax.tree.map(lambda p, d: p + eta * d, params, direction)
    kl = float(O.kl_between(graphdef, params, moved, rest, batch))
    np.testing.assert_allclose(kl, 0.5 * eta**2 * q, rtol=5e-2)
    # token_kl on two models = kl_between on their parameters
    kl2 = O.token_kl(model, nnx.merge(graphdef, moved, rest), [batch])
    np.testing.assert_allclose(kl2, kl, rtol=1e-5)


def test_gauss_newton_step_length_meets_the_kl_budget(setup):
    """The default step length: ½ η² dᵀGd = δ on the retain probe, and the measured retain KL of
    the step is δ to second order; the K-FAC-sized step (step_length="kfac") is a different one."""
    _, model, retain, forget, eigen, _ = setup
    delta = 1e-3
    hist: list = []
    new, _ = KD.kfade_unlearn(
        model, forget, retain, curvature=eigen, steps=1, trust_region=delta, kl_guard=None, history=hist
    )
    assert hist[0]["predicted_kl"] == pytest.approx(delta, rel=1e-4)
    np.testing.assert_allclose(O.token_kl(model, new, [retain[0]]), delta, rtol=0.15)
    old = KD.kfade_unlearn(model, forget, retain, curvature=eigen, steps=1, trust_region=delta,
                           step_length="kfac", kl_guard=None)[0]  # fmt: skip
    assert O.token_kl(model, old, [retain[0]]) != pytest.approx(delta, rel=0.15)


def test_kl_guard_shrinks_a_step_that_overshoots(setup):
    """A curvature 10⁴× too small makes the K-FAC-sized step far too long: the guard measures the
    retain KL, shrinks the step to within kl_guard × δ and says so in one line."""
    _, model, retain, forget, eigen, _ = setup
    wrong = {k: e._replace(ea=e.ea * 1e-4) for k, e in eigen.items()}
    lines: list[str] = []
    hist: list = []
    delta = 1e-3
    kw = dict(curvature=wrong, steps=1, trust_region=delta, step_length="kfac", damping=1e-8,
              damping_mode="absolute")  # fmt: skip
    unguarded = KD.kfade_unlearn(model, forget, retain, kl_guard=None, **kw)[0]
    assert O.token_kl(model, unguarded, [retain[0]]) > 10 * delta
    new, _ = KD.kfade_unlearn(model, forget, retain, kl_guard=2.0, history=hist, log=lines.append, **kw)
    assert len(lines) == 1 and "shrunk" in lines[0] and "step 1" in lines[0], lines
    assert hist[0]["shrink"] < 1 and hist[0]["retain_kl"] <= 2 * delta
    np.testing.assert_allclose(O.token_kl(model, new, [retain[0]]), hist[0]["retain_kl"], rtol=1e-4)
    with pytest.raises(DivergenceError, match="trust region"):
        KD._guarded(_Overshoot(), None, None, 1, delta, 2.0, None)


class _Overshoot:
    """A stepper whose every candidate overshoots (the KL never falls): the guard must give up."""

    def retain_kl(self, old, new):
        return 1.0


def test_kfade_unlearn_raises_forget_nll(setup):
    _, model, retain, forget, eigen, _ = setup
    before = float(KD.forget_nll(model, forget[0]))
    snapshot = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    new, delta = KD.kfade_unlearn(model, forget, retain, curvature=eigen, steps=3, trust_region=0.05)
    after = float(KD.forget_nll(new, forget[0]))
    assert after > before + 0.05, (before, after)
    # the original model is untouched and delta = new − old
    for a, b in zip(jax.tree.leaves(snapshot), jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    new_p, old_p = nnx.state(new, nnx.Param), nnx.state(model, nnx.Param)
    for d, n, o in zip(jax.tree.leaves(delta), jax.tree.leaves(new_p), jax.tree.leaves(old_p), strict=True):
        np.testing.assert_allclose(np.asarray(d), np.asarray(n) - np.asarray(o), atol=1e-7)
    # the high-level entry point estimates the curvature itself (EK-FAC here)
    new2, _ = KD.kfade_unlearn(
        model, forget, retain, steps=1, trust_region=0.05, ekfac=True, fisher="empirical"
    )
    assert float(KD.forget_nll(new2, forget[0])) > before


def test_save_and_reapply_delta(setup, tmp_path):
    import torch
    import transformers

    path, model, retain, forget, eigen, _ = setup
    new, delta = KD.kfade_unlearn(model, forget, retain, curvature=eigen, steps=2, trust_region=0.05)
    delta_file = R.save_delta(delta, model, tmp_path / "delta.safetensors", metadata={"method": "kfade"})
    tensors, meta = R.load_delta(delta_file)
    assert meta["model_type"] == "llama" and meta["extra"] == {"method": "kfade"}
    assert "model.layers.1.mlp.down_proj.weight" in tensors  # HF names and layout, per layer
    assert "model.embed_tokens.weight" not in tensors  # frozen: not stored
    assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (64, 32)  # [out, in]
    out = R.reapply(delta_file, path, tmp_path / "reapplied")
    # transformers loads the re-applied checkpoint and gives the unlearned model's logits
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = forget[0]["input_ids"][:2]
    with torch.no_grad():
        ref = tm(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(new(jnp.asarray(ids))), ref, rtol=1e-4, atol=1e-4)
    # scale = −1 undoes it
    back = R.reapply(delta_file, out, tmp_path / "undone", scale=-1.0)
    orig = sga_jax.load_model(path)
    np.testing.assert_allclose(
        np.asarray(sga_jax.load_model(back)(jnp.asarray(ids))), np.asarray(orig(jnp.asarray(ids))), atol=1e-5
    )


def test_bad_input(setup, tmp_path):
    path, model, _, forget, eigen, _ = setup
    with pytest.raises(ConfigError, match="damping"):
        kfade(eigen, damping=0.0)
    with pytest.raises(ConfigError, match="trust_region"):
        kfade(eigen, trust_region=-1.0)
    with pytest.raises(ConfigError, match="steps"):
        KD.kfade_unlearn(model, forget, curvature=eigen, steps=0)
    with pytest.raises(ConfigError, match="retain_batches"):
        KD.kfade_unlearn(model, forget)
    with pytest.raises(ConfigError, match="retain_batches"):  # the step length needs a retain probe
        KD.kfade_unlearn(model, forget, curvature=eigen)
    with pytest.raises(ConfigError, match="step_length"):
        KD.kfade_unlearn(model, forget, curvature=eigen, step_length="line_search")
    with pytest.raises(ConfigError, match="kl_guard"):
        KD.kfade_unlearn(model, forget, curvature=eigen, kl_guard=0.5)
    with pytest.raises(ModelLoadError, match="does not exist"):
        R.load_delta(tmp_path / "missing.safetensors")
    # a delta from a wider model does not fit
    wide_path, _ = write_tiny_hf("llama", tmp_path / "wide", hidden_size=48, num_attention_heads=4)
    wide = sga_jax.load_model(wide_path)
    d = jax.tree.map(jnp.ones_like, nnx.state(wide, nnx.Param))
    f = R.save_delta(d, wide, tmp_path / "wide.safetensors")
    with pytest.raises(ModelLoadError, match="shape"):
        R.reapply(f, path, tmp_path / "bad")
