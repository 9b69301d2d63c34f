"""Meshes, partition rules, and the 8-device sharded forward == the unsharded one."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.errors import ConfigError
from sga_jax.models import sharding as S


def test_make_mesh_sizes():
    assert jax.device_count() == 8
    mesh = S.make_mesh(data=2, fsdp=-1, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(S.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ConfigError, match="devices"):
        S.make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match="-1"):
        S.make_mesh(data=-1, fsdp=-1)


@pytest.mark.parametrize(
    "model_type,scan", [("llama", False), ("llama", True), ("opt", True), ("phi", False), ("gemma2", True)]
)
def test_sharded_forward_equals_unsharded(tmp_path, model_type, scan):
    path, _ = write_tiny_hf(model_type, tmp_path / "m")
    mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
    plain = sga_jax.load_model(path, scan_layers=scan)
    sharded = sga_jax.load_model(path, scan_layers=scan, mesh=mesh)

    layer = sharded.layers if scan else sharded.layers[0]
    q = layer.self_attn.q_proj.kernel[...]
    lead = (None,) if scan else ()
    assert q.sharding.spec == jax.sharding.PartitionSpec(*lead, "fsdp", "tensor")
    # really split: each device holds a quarter of the matrix ([32, 32]; Gemma 2's [32, 64])
    assert q.addressable_shards[0].data.shape == (*q.shape[:-2], q.shape[-2] // 2, q.shape[-1] // 2)
    o = layer.self_attn.o_proj.kernel[...]
    assert o.sharding.spec == jax.sharding.PartitionSpec(*lead, "tensor", "fsdp")
    emb = sharded.embed_tokens.embedding[...]
    assert emb.addressable_shards[0].data.shape == (48, 16)

    ids = np.random.RandomState(0).randint(3, 96, size=(8, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    fwd = nnx.jit(lambda m, x, a: m(x, a))
    ref = np.asarray(fwd(plain, ids, mask))
    batch = S.batch_sharding(mesh)
    out = fwd(sharded, jax.device_put(ids, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_shard_model_after_load(tmp_path):
    path, _ = write_tiny_hf("llama", tmp_path / "m")
    model = sga_jax.load_model(path)
    ids = np.arange(20, dtype=np.int32).reshape(2, 10) + 3
    ref = np.asarray(model(ids))
    mesh = S.make_mesh(data=1, fsdp=4, tensor=2)
    S.shard_model(model, mesh)
    up = model.layers[1].mlp.up_proj.kernel[...]
    assert len({s.device for s in up.addressable_shards}) == 8
    assert up.addressable_shards[0].data.shape == (8, 32)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(model, ids)), ref, atol=1e-5)
