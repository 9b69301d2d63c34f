"""The GPU test lane (issue 12): float32 matmuls pinned to full precision; `make test-gpu` and
benchmarks/device/gpu_check.sh run the same tests, and the scripts stay inside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_float32_matmul_precision_is_pinned():
    assert jax.config.jax_default_matmul_precision == "highest"
    # And it reaches the compiled product: the HLO asks for HIGHEST.
    x = jnp.ones((4, 4), jnp.float32)
    hlo = jax.jit(lambda a: a @ a).lower(x).as_text()
    assert "HIGHEST" in hlo
    np.testing.assert_allclose(np.asarray(x @ x), 4.0)


def test_make_test_gpu_runs_the_listed_tests():
    listed = (ROOT / "benchmarks/device/gpu_tests.txt").read_text().split()
    assert listed and all((ROOT / t).is_file() for t in listed)
    assert "tests/test_attention.py" in listed  # the gpu-marked cuDNN test
    dry = subprocess.run(
        ["make", "-n", "test-gpu", "GPU_PY=python3"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert '-o addopts="" -m "not slow"' in dry and all(t in dry for t in listed)
    check = (ROOT / "benchmarks/device/gpu_check.sh").read_text()
    assert "$(cat benchmarks/device/gpu_tests.txt)" in check


def test_device_scripts_do_not_point_outside_the_repository():
    for script in (ROOT / "benchmarks/device").iterdir():
        text = script.read_text()
        assert not re.search(r"\.\./|/work/|shared/", text), script.name
