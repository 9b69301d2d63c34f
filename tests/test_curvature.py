"""K-FAC factors and the Kronecker preconditioner against explicit references.

* tiny Llama (HF checkpoint written by transformers): A, G equal a per-token loop over the PyTorch
  reference's layer inputs / output gradients (forward + backward hooks), padding masked;
* scanned and unrolled layouts give the same factors;
* a small MLP with softmax CE, one example: A ⊗ G equals the exact GGN block from ``jax.jacfwd``;
* ``(A ⊗ G + λI)⁻¹`` solves the linear system; EK-FAC reduces to K-FAC on one token and matches a
  brute-force per-token loop, on random vectors and on the tiny Llama's own per-token a_t, g_t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sga_jax import curvature as C
from sga_jax import kfac_math as M
from sga_jax.errors import ConfigError, DataError
from sga_jax.models.layers import Linear
from tests.tiny_models import write_tiny_hf

KEY = 0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama with q/k/v/o biases (so A's appended 1 is tested) and its torch reference."""
    import sga_jax

    path, torch_model = write_tiny_hf("llama", tmp_path_factory.mktemp("kfac") / "llama", attention_bias=True)
    unrolled = sga_jax.load_model(path, dtype="float32", scan_layers=False)
    scanned = sga_jax.load_model(path, dtype="float32", scan_layers=True)
    return path, torch_model, unrolled, scanned


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 96, size=(3, 9)).astype(np.int32)
    attn = np.ones((3, 9), np.int32)
    attn[1, 6:] = 0  # right padding
    attn[2, 4:] = 0
    ids[attn == 0] = 0
    loss = np.zeros((3, 9), np.int32)
    loss[:, 3:] = 1  # answer tokens: 3.. (prompt 0..2)
    loss *= attn
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _torch_per_token(torch_model, batch, labels):
    """Per layer, the PyTorch reference's input ``a_t`` (a 1 appended with a bias) and output
    gradient ``g_t`` of every real token, from forward + backward hooks: ``{key: ([M, in'], [M, out])}``."""
    import torch

    store = {}
    hooks = []
    for name, mod in torch_model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":

            def hook(mod, inp, out, name=name):
                out.retain_grad()
                store[name] = (inp[0].detach(), out, mod.bias is not None)

            hooks.append(mod.register_forward_hook(hook))
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    attn = torch.tensor(batch["attention_mask"], dtype=torch.long)
    logits = torch_model(input_ids=ids, attention_mask=attn).logits.float()[:, :-1]
    w = torch.tensor((batch["loss_mask"][:, 1:] * batch["attention_mask"][:, :-1]).astype(np.float32))
    y = torch.tensor(np.asarray(labels), dtype=torch.long)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
    )
    (ce * w.reshape(-1)).sum().backward()
    for h in hooks:
        h.remove()
    mask = batch["attention_mask"]
    tokens = {}
    for name, (x, out, has_bias) in store.items():
        x = x.double().numpy()
        g = out.grad.double().numpy()
        a_rows, g_rows = [], []
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if mask[b, t]:
                    a_rows.append(np.append(x[b, t], 1.0) if has_bias else x[b, t])
                    g_rows.append(g[b, t])
        tokens[name.removeprefix("model.").replace(".", "/")] = (np.array(a_rows), np.array(g_rows))
    return tokens


def _torch_factors(torch_model, batch, labels):
    """Per-token explicit K-FAC factors from PyTorch hooks (a loop over real tokens)."""
    factors = {}
    for key, (a_rows, g_rows) in _torch_per_token(torch_model, batch, labels).items():
        a_sum = sum(np.outer(a, a) for a in a_rows)
        g_sum = sum(np.outer(g, g) for g in g_rows)
        factors[key] = (a_sum / len(a_rows), g_sum / len(g_rows))
    return factors


def _close(actual, desired, rtol=1e-5):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_factors_equal_per_token_torch_reference(tiny_llama, batch, fisher):
    _, torch_model, unrolled, _ = tiny_llama
    f = C.estimate_factors(unrolled, [batch], fisher=fisher, key=KEY)
    if fisher == "empirical":
        labels = batch["input_ids"][:, 1:]
    else:  # the estimator's own draw: key -> fold_in(batch 0) -> fold_in(sample 0)
        logits = unrolled(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))[:, :-1]
        k = jax.random.fold_in(jax.random.fold_in(jax.random.key(KEY), 0), 0)
        labels = np.asarray(jax.random.categorical(k, logits, axis=-1))
        assert np.mean(labels == batch["input_ids"][:, 1:]) < 0.5  # really sampled, not the data
    ref = _torch_factors(torch_model, batch, labels)
    assert set(ref) == set(f.a)  # q/k/v/o/gate/up/down of both layers; LM head excluded
    assert float(f.num_tokens) == batch["attention_mask"].sum()
    for k, (a_ref, g_ref) in ref.items():
        assert f.a[k].dtype == jnp.float32 and f.g[k].dtype == jnp.float32
        _close(f.a[k], a_ref)
        _close(f.g[k], g_ref)
    assert f.a["layers/0/self_attn/q_proj"].shape == (33, 33)  # bias: 32 inputs + 1
    # padding is masked: whatever sits in the padded slots changes nothing
    other = dict(batch)
    other["input_ids"] = np.where(batch["attention_mask"] == 0, 77, batch["input_ids"]).astype(np.int32)
    f2 = C.estimate_factors(unrolled, [other], fisher=fisher, key=KEY)
    for k in f.a:
        _close(f2.a[k], f.a[k], 1e-6)
        _close(f2.g[k], f.g[k], 1e-6)


def test_scanned_and_unrolled_layouts_agree(tiny_llama, batch):
    _, _, unrolled, scanned = tiny_llama
    batches = [batch, {k: v[::-1] for k, v in batch.items()}]
    fu = C.estimate_factors(unrolled, batches, fisher="sampled", key=3)
    fs = C.estimate_factors(scanned, batches, fisher="sampled", key=3)
    assert fs.a["layers/mlp/down_proj"].shape == (2, 64, 64)
    for k in fs.a:
        for i in range(2):
            uk = k.replace("layers/", f"layers/{i}/", 1)
            _close(fs.a[k][i], fu.a[uk], 1e-5)
            _close(fs.g[k][i], fu.g[uk], 1e-5)
    # the user's model is left as it was: taps off, no perturbation / intermediate variables
    assert not scanned.layers.mlp.up_proj.kfac_tap
    assert not nnx.state(scanned, nnx.Intermediate)


def test_layer_filter_lm_head_and_errors(tiny_llama, batch):
    _, _, unrolled, _ = tiny_llama
    f = C.estimate_factors(
        unrolled, [batch], fisher="empirical", layer_filter=r"o_proj$|lm_head", include_lm_head=True
    )
    assert sorted(f.a) == ["layers/0/self_attn/o_proj", "layers/1/self_attn/o_proj", "lm_head"]
    assert f.a["lm_head"].shape == (32, 32) and f.g["lm_head"].shape == (96, 96)
    with pytest.raises(ConfigError, match="fisher"):
        C.estimate_factors(unrolled, [batch], fisher="fisherman")
    with pytest.raises(ConfigError, match="no dense layer"):
        C.estimate_factors(unrolled, [batch], layer_filter="nothing_matches")
    with pytest.raises(DataError, match="no retain batches"):
        C.estimate_factors(unrolled, [])


# --------------------------------------------------------------------------- exact GGN on an MLP


class MLP(nnx.Module):
    """Three dense blocks (biases on the first and last) and softmax cross-entropy on top."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = Linear(5, 7, use_bias=True, rngs=rngs)
        self.l2 = Linear(7, 6, rngs=rngs)
        self.l3 = Linear(6, 4, use_bias=True, rngs=rngs)
        for layer in (self.l1, self.l2, self.l3):  # weights of order 1: a non-trivial GGN
            layer.kernel.set_value(layer.kernel.get_value() * 40.0)
        self.l1.bias.set_value(jnp.linspace(-0.5, 0.5, 7))
        self.l3.bias.set_value(jnp.linspace(-0.3, 0.3, 4))

    def __call__(self, x):
        return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def mlp_forward(model, batch):
    n = batch["x"].shape[0]
    return C.Targets(model(batch["x"]), batch["y"], jnp.ones((n,)), jnp.ones((n,)))


@pytest.fixture(scope="module")
def mlp_example():
    model = MLP(nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (1, 5))
    return model, {"x": x, "y": jnp.array([2])}


def _exact_ggn(model, x, layer: str):
    """Jᵀ (diag p − ppᵀ) J w.r.t. the layer's W̃ = [W; b] (row-major vec of [in', out])."""
    graphdef, state = nnx.split(model)
    mod = getattr(model, layer)
    n_in, n_out = mod.kernel.get_value().shape
    has_bias = mod.bias is not None

    def logits_of(w_tilde):
        s = jax.tree.map(lambda v: v, state)
        s[layer]["kernel"].set_value(w_tilde[:n_in])
        if has_bias:
            s[layer]["bias"].set_value(w_tilde[n_in])
        return nnx.merge(graphdef, s)(x)[0]

    w0 = mod.kernel.get_value()
    if has_bias:
        w0 = jnp.concatenate([w0, mod.bias.get_value()[None]], axis=0)
    jac = jax.jacfwd(logits_of)(w0).reshape(4, -1)
    p = jax.nn.softmax(logits_of(w0))
    h = jnp.diag(p) - jnp.outer(p, p)
    return np.asarray(jac.T @ h @ jac, np.float64)


@pytest.mark.parametrize("layer", ["l1", "l2", "l3"])
def test_one_example_kfac_equals_exact_ggn(mlp_example, layer):
    model, batch = mlp_example
    f = C.estimate_factors(model, [batch], fisher="exact", forward=mlp_forward)
    kfac = np.kron(np.asarray(f.a[layer], np.float64), np.asarray(f.g[layer], np.float64))
    ggn = _exact_ggn(model, batch["x"], layer)
    assert np.abs(ggn).max() > 1e-3  # not a trivially small block
    _close(kfac, ggn, 1e-5)


def test_sampled_fisher_converges_to_exact(mlp_example):
    model, batch = mlp_example
    exact = C.estimate_factors(model, [batch], fisher="exact", forward=mlp_forward)
    sampled = C.estimate_factors(model, [batch], fisher="sampled", num_samples=4000, forward=mlp_forward)
    emp = C.estimate_factors(model, [batch], fisher="empirical", forward=mlp_forward)
    for k in exact.g:
        err = np.linalg.norm(sampled.g[k] - exact.g[k]) / np.linalg.norm(exact.g[k])
        assert err < 0.1, (k, err)  # Monte-Carlo error ~ 1/sqrt(4000) per entry
        _close(sampled.a[k], exact.a[k], 1e-6)
    # the empirical Fisher is a different matrix (one label, not the expectation)
    assert np.linalg.norm(emp.g["l3"] - exact.g["l3"]) > 0.1 * np.linalg.norm(exact.g["l3"])


# --------------------------------------------------------------------------- the preconditioner


def _random_psd(key, n, rank=None):
    x = jax.random.normal(key, (n, rank or n + 3))
    return x @ x.T / x.shape[1]


@pytest.mark.parametrize("stack", [(), (3,)])
@pytest.mark.parametrize(("rank", "lam"), [(12, 1e-2), (4, 1e-1)])
def test_damped_inverse_solves_the_kronecker_system(stack, rank, lam):
    """Relative residual <= 1e-5 (float32 eigh: the attainable accuracy is ~ε·κ, hence a damping of
    1e-2 of the O(1) spectrum for a full-rank A and 1e-1 for a rank-4 one)."""
    keys = jax.random.split(jax.random.key(0), 3)
    a = jax.vmap(lambda k: _random_psd(k, 9, rank=rank))(jax.random.split(keys[0], 3))
    g = jax.vmap(lambda k: _random_psd(k, 5))(jax.random.split(keys[1], 3))
    v = jax.random.normal(keys[2], (3, 9, 5))
    if not stack:
        a, g, v = a[0], g[0], v[0]
    x = M.damped_inverse(M.kron_eigh(a, g), v, lam)
    residual = M.kron_matvec(a, g, x, lam) - v
    rel = float(jnp.linalg.norm(residual) / jnp.linalg.norm(v))
    assert rel <= 1e-5, rel
    # and it agrees with the dense solve of (A ⊗ G + λI) vec(X) = vec(V) (row-major vec)
    a0, g0, v0 = (np.asarray(t, np.float64).reshape(-1, *t.shape[-2:])[0] for t in (a, g, v))
    dense = np.linalg.solve(np.kron(a0, g0) + lam * np.eye(45), v0.reshape(-1)).reshape(9, 5)
    _close(np.asarray(x).reshape(-1, 9, 5)[0], dense, 1e-4)


def test_precondition_on_a_parameter_tree(mlp_example):
    """Kernel + bias are solved jointly as W̃ = [W; b]; parameters without curvature are frozen."""
    model, batch = mlp_example
    x = jax.random.normal(jax.random.key(5), (8, 5))
    f = C.estimate_factors(model, [{"x": x, "y": jnp.arange(8) % 4}], fisher="exact", forward=mlp_forward)
    eigen = C.eigendecompose(f)
    grads = jax.tree.map(
        lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), nnx.state(model, nnx.Param)
    )
    grads["extra"] = {"scale": jnp.ones((3,))}  # e.g. a norm: no curvature
    lam = 1e-1
    pg, quad = M.precondition(eigen, grads, lam)
    total = 0.0
    for k in ("l1", "l2", "l3"):
        v = grads[k]["kernel"]
        x = pg[k]["kernel"]
        if k != "l2":
            v = jnp.concatenate([v, grads[k]["bias"][None]], axis=0)
            x = jnp.concatenate([x, pg[k]["bias"][None]], axis=0)
        res = M.kron_matvec(f.a[k], f.g[k], x, lam) - v
        assert float(jnp.linalg.norm(res) / jnp.linalg.norm(v)) <= 1e-5
        total += float(jnp.sum(x * v))
    np.testing.assert_allclose(float(quad), total, rtol=1e-5)
    assert not np.any(np.asarray(pg["extra"]["scale"]))
    pg_id, _ = M.precondition(eigen, grads, lam, untapped="identity")
    np.testing.assert_allclose(np.asarray(pg_id["extra"]["scale"]), 1 / lam, rtol=1e-6)
    with pytest.raises(ConfigError, match="untapped"):
        M.precondition(eigen, grads, lam, untapped="thaw")


def test_ekfac_diagonal():
    keys = jax.random.split(jax.random.key(4), 4)
    # one token: EK-FAC's S equals K-FAC's λ_A λ_Gᵀ exactly
    a1, g1 = jax.random.normal(keys[0], (1, 6)), jax.random.normal(keys[1], (1, 4))
    eig = M.kron_eigh(a1.T @ a1, g1.T @ g1)
    s = M.ekfac_diagonal(eig, a1, g1, jnp.ones((1,)))
    _close(s, M.eigenvalues(eig), 1e-5)
    # many tokens: S_ij = Σ_t (Q_Aᵀ a_t)_i² (Q_Gᵀ g_t)_j², checked with a plain loop
    a, g = jax.random.normal(keys[2], (7, 6)), jax.random.normal(keys[3], (7, 4))
    mask = jnp.array([1, 1, 0, 1, 1, 1, 0], jnp.float32)
    eig = M.kron_eigh(a.T @ a, g.T @ g)
    ref = sum(
        float(mask[t]) * np.outer(np.asarray(eig.qa.T @ a[t]) ** 2, np.asarray(eig.qg.T @ g[t]) ** 2)
        for t in range(7)
    )
    _close(M.ekfac_diagonal(eig, a, g, mask), ref, 1e-5)


def test_ekfac_diagonal_on_the_model_equals_a_per_token_loop(tiny_llama, batch):
    """EK-FAC (George et al. 2018, eq. 10) on the tiny Llama: S = (1/M) Σ_t (Q_Aᵀ a_t)² (Q_Gᵀ g_t)ᵀ²
    over the M real tokens, with a_t, g_t of each token from the PyTorch reference's hooks, in the
    Kronecker eigenbasis the estimator returns (which diagonalises the reference's A and G)."""
    _, torch_model, unrolled, scanned = tiny_llama
    eigen = C.estimate_curvature(unrolled, [batch], fisher="empirical", ekfac=True)
    tokens = _torch_per_token(torch_model, batch, batch["input_ids"][:, 1:])
    assert set(tokens) == set(eigen)
    for k, (a_rows, g_rows) in tokens.items():
        qa, qg = np.asarray(eigen[k].qa, np.float64), np.asarray(eigen[k].qg, np.float64)
        a_ref = sum(np.outer(a, a) for a in a_rows) / len(a_rows)
        rotated = qa.T @ a_ref @ qa  # the basis is A's eigenbasis: off-diagonal ~ 0
        off = rotated - np.diag(np.diag(rotated))
        assert np.abs(off).max() <= 1e-4 * np.abs(rotated).max(), k
        s_ref = sum(np.outer((qa.T @ a) ** 2, (qg.T @ g) ** 2) for a, g in zip(a_rows, g_rows))
        s_ref = s_ref / len(a_rows)
        _close(eigen[k].s, s_ref, 1e-4)
    # the scanned layout stacks the same diagonals (compared through the basis-free trace)
    stacked = C.estimate_curvature(scanned, [batch], fisher="empirical", ekfac=True)
    e = stacked["layers/mlp/up_proj"]
    assert e.s.shape == (2, 32, 64)
    for i in range(2):
        np.testing.assert_allclose(
            float(jnp.sum(e.s[i])), float(jnp.sum(eigen[f"layers/{i}/mlp/up_proj"].s)), rtol=1e-4
        )


def test_factors_sharded_along_rows(tiny_llama, batch):
    from sga_jax.models import sharding as S

    _, _, _, scanned = tiny_llama
    mesh = S.make_mesh(data=1, fsdp=-1, tensor=1)  # 8 simulated devices
    f = C.estimate_factors(scanned, [batch], fisher="empirical", mesh=mesh)
    ref = C.estimate_factors(scanned, [batch], fisher="empirical")
    a = f.a["layers/mlp/gate_proj"]  # [2, 32, 32]: rows split 8 ways
    assert a.sharding.spec[1] == "fsdp"
    _close(a, ref.a["layers/mlp/gate_proj"], 1e-6)
