"""Scale: a sharded SGA step equals the single-device one, on 8 simulated devices and across 2 processes.

(a) One SGA training step (tiny Llama, K = 4, chunked log-prob kernel, clipping + AdamW, donated
    state, jit with shardings) on an fsdp × tensor mesh and on pure data parallelism gives the same
    parameters as on one device.
(b) Two local processes joined by ``jax.distributed.initialize`` (gloo CPU collectives), 4 CPU
    devices each, run the same step on one 8-device mesh: the multi-host GPU / TPU-pod path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import scale_worker as W

from sga_jax import distributed
from sga_jax.models import sharding as S

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single_device() -> dict[str, np.ndarray]:
    return W.sga_step(mesh=None)


def _assert_same(out: dict, ref: dict) -> None:
    assert set(out) >= set(ref)
    for name, want in ref.items():
        np.testing.assert_allclose(np.asarray(out[name]), want, atol=TOL, rtol=0, err_msg=name)


def test_single_device_step_moves_parameters(single_device):
    """The comparison is not vacuous: the step changes parameters by far more than the tolerance."""
    init = W.initial_params()
    assert set(init) == set(single_device) - {"loss"}
    moved = max(float(np.max(np.abs(single_device[k] - init[k]))) for k in init)
    assert moved > 50 * TOL
    assert np.isfinite(single_device["loss"])


@pytest.mark.parametrize(
    "mesh_shape", [(1, 4, 2), (2, 2, 2), (8, 1, 1)], ids=["fsdp4xtp2", "dp2xfsdp2xtp2", "dp8"]
)
def test_sharded_step_equals_single_device(single_device, mesh_shape):
    assert jax.device_count() == 8
    mesh = S.make_mesh(*mesh_shape)
    _assert_same(W.sga_step(mesh), single_device)


def test_maybe_initialize_off_by_default(monkeypatch):
    monkeypatch.delenv(distributed.ENV_FLAG, raising=False)
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize(False) is False
    assert not distributed.is_initialized()
    monkeypatch.setenv(distributed.ENV_FLAG, "0")
    assert distributed.env_enabled() is False
    monkeypatch.setenv(distributed.ENV_FLAG, "1")
    assert distributed.env_enabled() is True


def test_gather_to_host_single_process():
    mesh = S.make_mesh(1, 4, 2)
    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    arr = distributed.global_array(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    )
    assert arr.addressable_shards[0].data.shape == (2, 4)
    out = distributed.gather_to_host({"x": arr})
    np.testing.assert_array_equal(out["x"], x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_process_step_equals_single_process(tmp_path, single_device):
    port = _free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "SGA_JAX_DISTRIBUTED"))
    }
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs, outs = [], []
    for i in range(2):
        out = tmp_path / f"proc{i}.npz"
        outs.append(out)
        cmd = [sys.executable, str(Path(W.__file__)), "--process-id", str(i), "--num-processes", "2",
               "--port", str(port), "--devices", "4", "--mesh", "1,4,2", "--out", str(out)]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the 2-process run did not finish in 120 s (hung collective?)")
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    for i, out in enumerate(outs):
        result = dict(np.load(out))
        assert int(result.pop("process_index")) == i
        assert int(result.pop("local_devices")) == 4
        _assert_same(result, single_device)
