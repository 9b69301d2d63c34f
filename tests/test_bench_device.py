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


def test_load_verdict_names_what_made_the_machine_loaded(bench):
    assert bench.load_verdict(0.1, 0.05, 0.5, 0.25) is None
    assert "load average 1.20" in bench.load_verdict(1.2, 0.0, 0.5, 0.25)
    assert "other processes used 0.80 cores" in bench.load_verdict(0.1, 0.8, 0.5, 0.25)
    assert bench.load_verdict(0.1, None, 0.5, 0.25) is None  # no /proc/stat: the load average only


def test_busy_cpu_seconds_counts_this_process_work(bench):
    import time

    before = bench._busy_cpu_seconds()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # 0.3 CPU-seconds of our own
        pass
    assert bench._busy_cpu_seconds() - before >= 0.25


def test_a_loaded_machine_writes_no_result(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert bench.main(["--quick", "--max-load", "-1"]) == 3  # any load average is above -1
    assert "the machine is loaded" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
