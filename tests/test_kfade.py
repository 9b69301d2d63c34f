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
from sga_jax import reapply as R
from sga_jax.errors import ConfigError, ModelLoadError
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


def test_transform_takes_a_trust_region_step(setup):
    _, model, _, forget, eigen, factors = setup
    params, grads = _forget_grads(model, forget[0])
    lam, delta = 1e-3, 1e-2
    tx = kfade(eigen, damping=lam, trust_region=delta)
    state = tx.init(params)
    assert isinstance(state, KFADEState) and set(state.eigen) == set(eigen)
    updates, state = jax.jit(tx.update)(grads, state, params)
    # ½ Δᵀ(F + λI)Δ = δ with F = A ⊗ G per layer, computed with the explicit operator
    quad = 0.0
    for k in factors.a:
        node = updates
        for name in k.split("/"):
            node = node[name]
        d = node["kernel"]
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
    tx2 = kfade(eigen, damping=lam, trust_region=delta, ascend=False)
    u2, _ = tx2.update(neg, tx2.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(u2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-8)
    # η is capped by max_step_size; it composes in an optax chain
    tx3 = optax.chain(optax.identity(), kfade(eigen, damping=lam, trust_region=delta, max_step_size=1e-9))
    u3, s3 = tx3.update(grads, tx3.init(params), params)
    assert float(s3[1].last_step_size) == pytest.approx(1e-9)


def test_kfade_unlearn_raises_forget_nll(setup):
    _, model, retain, forget, eigen, _ = setup
    before = float(KD.forget_nll(model, forget[0]))
    snapshot = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    new, delta = KD.kfade_unlearn(model, forget, curvature=eigen, steps=3, damping=1e-3, trust_region=0.05)
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

    path, model, _, forget, eigen, _ = setup
    new, delta = KD.kfade_unlearn(model, forget, curvature=eigen, steps=2, trust_region=0.05)
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
    with pytest.raises(ModelLoadError, match="does not exist"):
        R.load_delta(tmp_path / "missing.safetensors")
    # a delta from a wider model does not fit
    wide_path, _ = write_tiny_hf("llama", tmp_path / "wide", hidden_size=48, num_attention_heads=4)
    wide = sga_jax.load_model(wide_path)
    d = jax.tree.map(jnp.ones_like, nnx.state(wide, nnx.Param))
    f = R.save_delta(d, wide, tmp_path / "wide.safetensors")
    with pytest.raises(ModelLoadError, match="shape"):
        R.reapply(f, path, tmp_path / "bad")
