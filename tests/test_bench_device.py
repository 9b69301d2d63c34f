"""benchmarks/step_vs_torch.py labels a run by every child's device (issue 12: a GPU run whose
`peak` child was skipped was written as a CPU run with "GPU: not run")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_vs_torch.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_vs_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_label_without_the_peak_child(bench):
    results = [
        dict(framework="sga_jax", device="NVIDIA H100 80GB HBM3", backend="gpu", step_s=0.3),
        dict(framework="torch", device="NVIDIA H100 80GB HBM3", backend="gpu", step_s=0.4),
    ]
    assert bench.run_device(results) == (True, "NVIDIA H100 80GB HBM3")


def test_gpu_label_from_any_child_even_when_others_failed(bench):
    results = [dict(framework="peak", error="failed"), dict(framework="torch", backend="gpu", device="H200")]
    assert bench.run_device(results) == (True, "H200")


def test_cpu_label_when_every_child_ran_on_cpu(bench):
    on_gpu, label = bench.run_device([dict(framework="sga_jax", backend="cpu", device="cpu")])
    assert not on_gpu and label.startswith("cpu: ")
