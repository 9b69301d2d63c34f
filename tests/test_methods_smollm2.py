"""Every training method through ``sga-jax unlearn`` on the real SmolLM2-135M-Instruct GGUF: two
steps on TOFU forget01 (4 rows, the retain99 pool), each method at its own config's defaults
(``configs/method/NAME.yaml``) with only the run's size set here. The run must finish, export a
model and log finite metrics with a nonzero gradient at both steps. Marked ``slow`` (about a
minute a method on a 2-core CPU, compile included; ``pytest -m slow tests/test_methods_smollm2.py``):
the default suite checks each method's step
against its torch re-derivation on a tiny model (tests/test_runner_baselines.py,
tests/test_runner_methods.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sga_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
METHODS = [p.stem for p in sorted((ROOT / "configs/method").glob("*.yaml"))]
RMU_LAYERS = r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight"


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_method_runs_two_steps_on_smollm2(name, smollm2_gguf, data_dir, tmp_path):
    out = tmp_path / "run"
    method = [f"method={name}"]
    if name.startswith("kfade"):
        method += ["method.curvature_batches=1", "method.steps=1"]
    extra = [f"method.trainable=[{RMU_LAYERS}]"] if name.endswith("rmu") else []
    rc = main(
        ["unlearn", *method, *extra, "benchmark=tofu_forget01",
         f"model.path={smollm2_gguf}", f"output_dir={out}", f"data.data_dir={data_dir}", "data.limit=4",
         "data.max_length=96", "train.batch_size=2", "train.steps=2", "train.lr=1e-5", "eval.benchmark=none",
         "train.progress=false", "train.max_forget_nll=null"]
    )  # fmt: skip
    assert rc == 0
    assert (out / "model").is_dir()
    if not name.startswith("kfade"):
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "grad_norm" in r]
        assert len(steps) == 2, recs
        for r in steps:
            assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
            assert r["grad_norm"] > 0, r
