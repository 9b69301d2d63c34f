"""Normal-sample retrieval for SGA: known neighbours, never a forget item, deterministic, saved."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sga_jax.data import normal_samples as NS
from sga_jax.errors import ConfigError, DataError


def _constructed_pool(seed=0, n_forget=5, d=8, per_cluster=3, noise=0.05):
    """Forget i sits in cluster i; the pool holds ``per_cluster`` near copies of it (known nearest
    neighbours, at increasing distance), the forget example itself, and far-away distractors."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, d)))[0][:n_forget]  # orthonormal directions
    forget = centres + noise * rng.normal(size=(n_forget, d))
    pool, truth = [], []
    for i in range(n_forget):
        ids = []
        for j in range(per_cluster):
            # Increasing angular offset: the j-th copy is the j-th nearest neighbour.
            off = rng.normal(size=d)
            off -= off @ forget[i] / (forget[i] @ forget[i]) * forget[i]
            pool.append(forget[i] + 0.1 * (j + 1) * off / np.linalg.norm(off) * np.linalg.norm(forget[i]))
            ids.append(len(pool) - 1)
        truth.append(ids)
    distractors = rng.normal(size=(20, d))
    pool.extend(distractors)
    # The forget examples themselves are in the pool too: they must never be returned.
    forget_ids = list(range(len(pool), len(pool) + n_forget))
    pool.extend(forget)
    perm = rng.permutation(len(pool))  # shuffle so indices carry no information
    inv = np.argsort(perm)
    pool = np.asarray(pool)[perm]
    truth = [[int(inv[t]) for t in row] for row in truth]
    forget_ids = [int(inv[t]) for t in forget_ids]
    return forget.astype(np.float32), pool.astype(np.float32), truth, forget_ids


def test_retrieval_returns_known_neighbours_in_order_and_never_forget_items():
    forget, pool, truth, forget_ids = _constructed_pool()
    out = NS.retrieve_normal_samples(forget, pool, 3, forget_ids_in_pool=forget_ids, seed=0)
    assert out.shape == (5, 3) and out.dtype == np.int64
    assert out.tolist() == truth
    assert not set(out.ravel()) & set(forget_ids)
    # Without the exclusion the forget example itself (cosine 1) would come first: the exclusion
    # is what keeps it out.
    leaky = NS.retrieve_normal_samples(forget, pool, 1, seed=0)
    assert set(leaky.ravel()) <= set(forget_ids)


def test_retrieval_deterministic_and_seed_breaks_ties_only():
    forget, pool, truth, forget_ids = _constructed_pool(seed=1)
    a = NS.retrieve_normal_samples(forget, pool, 3, forget_ids_in_pool=forget_ids, seed=7)
    b = NS.retrieve_normal_samples(forget, pool, 3, forget_ids_in_pool=forget_ids, seed=7)
    c = NS.retrieve_normal_samples(forget, pool, 3, forget_ids_in_pool=forget_ids, seed=8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)  # no ties here
    tied = np.ones((6, 4), np.float32)  # all pool rows identical: the seed decides
    picks = {tuple(NS.retrieve_normal_samples(tied[:1], tied, 2, seed=s)[0]) for s in range(6)}
    assert len(picks) > 1


def test_random_pairing_and_validation():
    p = NS.random_pairing(10, 8, 3, forget_ids_in_pool=[0, 1], seed=3)
    assert p.shape == (10, 3)
    assert all(len(set(row)) == 3 for row in p.tolist())
    assert not {0, 1} & set(p.ravel())
    np.testing.assert_array_equal(p, NS.random_pairing(10, 8, 3, forget_ids_in_pool=[0, 1], seed=3))
    with pytest.raises(DataError, match="fewer than K-1"):
        NS.random_pairing(2, 3, 3, forget_ids_in_pool=[0])
    with pytest.raises(ConfigError, match="K >= 2"):
        NS.retrieve_normal_samples(np.ones((2, 3)), np.ones((4, 3)), 0)
    with pytest.raises(ConfigError, match="same d"):
        NS.retrieve_normal_samples(np.ones((2, 3)), np.ones((4, 2)), 1)


def test_save_and_load_pairing(tmp_path):
    pairing = np.array([[3, 1], [0, 2]])
    path = NS.save_pairing(
        tmp_path / "run" / "normal_samples.json", pairing, meta={"k": 3, "method": "embedding"}
    )
    doc = json.loads(path.read_text())
    assert doc["meta"]["k"] == 3
    np.testing.assert_array_equal(NS.load_pairing(path), pairing)
    assert [p.name for p in path.parent.iterdir()] == ["normal_samples.json"]  # no temp file left
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a pairing file"):
        NS.load_pairing(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import write_tiny_hf

    import sga_jax

    path, torch_model = write_tiny_hf("llama", tmp_path_factory.mktemp("tiny") / "llama")
    return sga_jax.load_model(path, dtype="float32"), torch_model


def test_embed_is_masked_mean_of_final_hidden_states(tiny_llama):
    """Against transformers: the last entry of ``output_hidden_states`` (after the final norm)."""
    import torch

    model, torch_model = tiny_llama
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(5, 9)).astype(np.int32)
    attn = np.ones_like(ids)
    attn[1, 6:] = 0  # right padding
    attn[3, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": attn}
    emb = NS.embed(model, batch, batch_size=2)  # 5 rows in micro-batches of 2 (one padded)
    with torch.no_grad():
        out = torch_model(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(attn),
            output_hidden_states=True,
        )
    h = out.hidden_states[-1].numpy()
    m = attn[..., None].astype(np.float64)
    expected = (h * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
    idx = NS.retrieve(model, {k: v[:2] for k, v in batch.items()}, batch, 2, forget_ids_in_pool=[0, 1])
    assert idx.shape == (2, 2) and not {0, 1} & set(idx.ravel())
