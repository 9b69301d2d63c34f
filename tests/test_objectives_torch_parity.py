"""Gradient parity of the unlearning objectives against an independent PyTorch implementation.

The same tiny random HF Llama checkpoint is loaded by ``sga_jax.load_model`` and by transformers.
The torch side computes per-token log-probs from the full logits and writes SGA / NPO / GradDiff /
FLAT out from their papers' formulas (NPO as open-unlearning's ``compute_dpo_loss`` on the *summed*
answer NLL of ``compute_batch_nll``, src/trainer/utils.py l. 34-67); the JAX side goes through the
chunked log-prob kernel (``sga_jax.logprobs``, a chunk size that does not divide V) and
``sga_jax.objectives``. Every parameter's gradient must agree to 1e-4 relative error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax import logprobs
from sga_jax import objectives as O
from sga_jax.models.hf import hf_tensors
from sga_jax.transforms.sga import sga

B, K, T, V = 2, 4, 12, 96
CHUNK = 40  # 96 = 2·40 + 16: the last vocabulary chunk is partial


def _batch(rng, rows, prompt=4):
    ids = rng.integers(3, V, size=(rows, T)).astype(np.int32)
    attn = np.ones((rows, T), np.int32)
    for i in range(rows):
        n = T - int(rng.integers(0, 4))  # right padding of 0..3 tokens
        attn[i, n:] = 0
        ids[i, n:] = 0
    loss = attn.copy()
    loss[:, :prompt] = 0  # prompt tokens are not targets
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, torch_model = write_tiny_hf("llama", tmp_path_factory.mktemp("parity") / "llama", seed=3)
    model = sga_jax.load_model(path, dtype="float32")
    rng = np.random.default_rng(0)
    batches = {
        "forget": _batch(rng, B),
        "normal": _batch(rng, B * (K - 1)),
        "retain": _batch(rng, B),
        "template": _batch(rng, B, prompt=5),
    }

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def outputs(p):
        m = nnx.merge(graphdef, p, rest)
        out = {
            k: logprobs.sequence_nll(m, batches[k], chunk_size=CHUNK) for k in ("forget", "normal", "retain")
        }
        out["forget_sum"] = logprobs.sequence_nll(m, batches["forget"], chunk_size=CHUNK, reduction="sum")
        for k in ("forget", "template"):
            out[f"logp_{k}"], _ = logprobs.token_logprobs(m, batches[k], chunk_size=CHUNK)
        return out

    # One compilation: the vector-Jacobian product of all model outputs; each objective then only
    # supplies its cotangent (the chain rule, exactly jax.grad of the composed loss).
    def values_and_vjp(p, ct):
        out, pullback = jax.vjp(outputs, p)
        return out, pullback(ct)[0]

    both = jax.jit(values_and_vjp)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(outputs, params))
    values, _ = both(params, zeros)
    vjp = lambda p, ct: both(p, ct)[1]
    masks = {k: jnp.asarray(batches[k]["loss_mask"][:, 1:].astype(bool)) for k in ("forget", "template")}
    return dict(
        torch=torch_model,
        batches=batches,
        vjp=vjp,
        values=values,
        masks=masks,
        params=params,
        graphdef=graphdef,
        rest=rest,
    )


def jax_grads(s, loss_of_outputs):
    cts = jax.grad(loss_of_outputs)(s["values"])
    return s["vjp"](s["params"], cts)


# ----------------------------------------------------------------------------- torch reference


def _torch_logp(model, batch):
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    logits = model(ids, attention_mask=torch.as_tensor(batch["attention_mask"])).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = torch.as_tensor(batch["loss_mask"][:, 1:], dtype=torch.float32)
    return logp, mask


def _torch_nll(model, batch):
    logp, mask = _torch_logp(model, batch)
    return -(logp * mask).sum(-1) / mask.sum(-1)


def _torch_sga(model, b, r):
    l_f = _torch_nll(model, b["forget"])
    l_n = _torch_nll(model, b["normal"]).reshape(B, K - 1)
    return (-(1 - r * (K - 1) / K) * l_f - (r / K) * l_n.sum(1)).mean()


def _torch_npo(model, b, ref, beta=0.1):
    """open-unlearning compute_dpo_loss (no winner): lose_log_ratio = -(nll - ref_nll) with the
    summed per-sequence cross-entropy (ignore_index=-100) of compute_batch_nll."""
    ids = torch.as_tensor(b["forget"]["input_ids"], dtype=torch.long)
    labels = ids.clone()
    labels[torch.as_tensor(b["forget"]["loss_mask"]) == 0] = -100
    logits = model(ids, attention_mask=torch.as_tensor(b["forget"]["attention_mask"])).logits
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    nll = ce(logits[..., :-1, :].transpose(-1, -2), labels[..., 1:]).sum(dim=-1)
    lose_log_ratio = -(nll - torch.as_tensor(ref))
    return -2 / beta * F.logsigmoid(beta * (0.0 - lose_log_ratio)).mean()


def _torch_graddiff(model, b, alpha=0.7):
    return -_torch_nll(model, b["forget"]).mean() + alpha * _torch_nll(model, b["retain"]).mean()


def _torch_flat(model, b, div):
    def mean_prob(batch):
        logp, mask = _torch_logp(model, batch)
        return (logp.exp() * mask).sum(-1) / mask.sum(-1)

    p_f, p_e = mean_prob(b["forget"]), mean_prob(b["template"])
    if div == "kl":  # f-GAN Table 2: g(v) = v, f*(t) = exp(t - 1)
        return (-p_e + torch.exp(p_f - 1)).mean()
    if div == "js":  # g(v) = log 2 - log(1 + e^-v), f*(t) = -log(2 - e^t)
        g = lambda v: np.log(2.0) - torch.log1p(torch.exp(-v))
        return (-g(p_e) - torch.log(2 - torch.exp(g(p_f)))).mean()
    raise AssertionError(div)


def torch_grads(model, loss_fn) -> dict[str, np.ndarray]:
    model.zero_grad()
    loss_fn(model).backward()
    return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}


def compare(s, g_jax, g_torch, tol=1e-4):
    model = nnx.merge(s["graphdef"], g_jax, s["rest"])  # a model whose "weights" are the grads
    seen = set()
    worst = 0.0
    for name, value, transpose, layer in hf_tensors(model):
        a = np.asarray(value if layer is None or np.ndim(value) == np.ndim(g_torch[name]) else value[layer])
        a = a.T if transpose else a
        b = g_torch[name]
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
        assert err <= tol, f"{name}: relative error {err:.2e}"
        assert np.linalg.norm(b) > 0, f"{name}: zero gradient proves nothing"
        worst = max(worst, err)
        seen.add(name)
    assert seen == set(g_torch), set(g_torch) ^ seen  # every parameter compared
    print(f"worst relative gradient error {worst:.2e}")
    return worst


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("r", [0.0, -0.8, -4.0, 0.5, 1.0])
def test_sga_gradient_parity(setup, r):
    s = setup
    loss = lambda o: O.sga_loss(o["forget"], o["normal"].reshape(B, K - 1), r)
    g = jax_grads(s, loss)
    compare(s, g, torch_grads(s["torch"], lambda m: _torch_sga(m, s["batches"], r)))
    if r == 0.0:  # r = 0 is exactly gradient ascent
        g_ga = jax_grads(s, lambda o: O.ga_loss(o["forget"]))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ga)):
            np.testing.assert_array_equal(a, b)


def test_sga_transform_on_model_gradients_matches_torch(setup):
    """The transform fed with g_f and the mean-normal-NLL gradient gives torch's SGA gradient."""
    s = setup
    g_f = jax_grads(s, lambda o: jnp.mean(o["forget"]))
    g_n = jax_grads(s, lambda o: jnp.mean(o["normal"]))
    tx = sga(r=-0.8, K=K)
    d, _ = tx.update(g_f, tx.init(s["params"]), s["params"], normal_grads=g_n)
    compare(s, d, torch_grads(s["torch"], lambda m: _torch_sga(m, s["batches"], -0.8)))


def test_npo_gradient_parity(setup):
    s = setup
    # A reference model a little off the current one: summed NLL minus a few nats per row.
    ref = np.asarray(s["values"]["forget_sum"]) - np.array([3.0, -2.0])[:B].astype(np.float32)
    g = jax_grads(s, lambda o: O.npo_loss(o["forget_sum"], ref, beta=0.1))
    compare(s, g, torch_grads(s["torch"], lambda m: _torch_npo(m, s["batches"], ref)))


def test_graddiff_gradient_parity(setup):
    s = setup
    g = jax_grads(s, lambda o: O.graddiff_loss(o["forget"], o["retain"], alpha=0.7))
    compare(s, g, torch_grads(s["torch"], lambda m: _torch_graddiff(m, s["batches"])))


@pytest.mark.parametrize("div", ["kl", "js"])
def test_flat_gradient_parity(setup, div):
    s = setup
    mf, me = s["masks"]["forget"], s["masks"]["template"]
    g = jax_grads(s, lambda o: O.flat_loss(o["logp_forget"], mf, o["logp_template"], me, divergence=div))
    compare(s, g, torch_grads(s["torch"], lambda m: _torch_flat(m, s["batches"], div)))
