"""One optimizer step at ``train.grad_accum=2`` is the step at ``grad_accum=1`` on the same rows: the
micro-batch gradients are averaged, not summed. Under Adam a summed gradient would pass unseen (the
update is scale invariant), so the step runs with plain SGD, whose update is the gradient itself."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax import config as C
from sga_jax import methods, runner, train


def _batch(rng, n, t=12, answer_from=5):
    ids = rng.integers(3, 96, size=(n, t)).astype(np.int32)
    loss = np.zeros_like(ids)
    loss[:, answer_from:] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}


@pytest.mark.parametrize("method", ["graddiff", "npo"])
def test_two_micro_batches_equal_one_batch(tmp_path, method):
    path, _ = write_tiny_hf("llama", tmp_path / "m", seed=0)
    model = sga_jax.load_model(path)
    rng = np.random.default_rng(0)
    data = train.TrainData(forget=_batch(rng, 4), retain=_batch(rng, 4))
    cfg = C.compose([], [f"method={method}", "method.loss_reduction=sequence"])
    built = methods.build_method(cfg.method, "unlearn")
    runner.attach_method_data(model, data, cfg.method, runner.needs(cfg), seed=0)  # NPO's reference NLL
    graphdef, params, rest = train.split_model(model)
    tx = optax.sgd(0.5)
    p0 = jax.tree.map(np.array, params)

    def one_step(accum):
        step = train.make_step(graphdef, rest, built, tx, donate=False)
        batch = train.step_batch(data, 0, 4, accum, seed=0)
        new, _, metrics = step(jax.tree.map(np.array, p0), tx.init(p0), batch)
        return jax.tree.map(np.asarray, new), {k: float(v) for k, v in metrics.items()}, batch

    p1, m1, b1 = one_step(1)
    p2, m2, b2 = one_step(2)
    # the same rows, split in two
    np.testing.assert_array_equal(
        b1["forget"]["input_ids"].reshape(4, -1), b2["forget"]["input_ids"].reshape(4, -1)
    )
    # the reference: SGD on the gradient of the method's loss over the whole batch, taken here
    whole = jax.tree.map(lambda x: x[0], b1)
    g = jax.grad(lambda p: built.loss(nnx.merge(graphdef, p, rest), whole)[0])(p0)
    want = jax.tree.map(lambda p, gg: p - 0.5 * np.asarray(gg), p0, g)
    for got in (p1, p2):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-4)
