"""A run stopped (or killed) after k steps and resumed ends with exactly the parameters of a run that was
never interrupted (same seed): the data order is a function of the step, the optimizer state is
checkpointed with the parameters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_models import write_tiny_llama_for

import sga_jax
from sga_jax import checkpoint, config, runner, train
from sga_jax.cli import main
from sga_jax.errors import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama (with tokenizer) and a plain JSONL forget / retain set."""
    tok = smollm2_tokenizer
    root = tmp_path_factory.mktemp("resume")
    path, _ = write_tiny_llama_for(tok, root / "tiny")
    forget = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is number {i * 7}."} for i in range(6)]
    retain = [
        {"question": f"Who wrote book {i}?", "answer": f"Book {i} was written by author {i}."}
        for i in range(8)
    ]
    for name, rows in (("forget.jsonl", forget), ("retain.jsonl", retain)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def _overrides(root: Path, model: Path, out: Path) -> list[str]:
    # SGA with K = 2 (normal samples drawn at random), grad accumulation, checkpoints every 2 steps;
    # 6 forget rows / batch 4: the run crosses an epoch boundary (reshuffle) mid-way.
    return [
        "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"data.retain={root / 'retain.jsonl'}",
        f"model.path={model}", f"output_dir={out}",
        "method=sga", "method.k=2", "method.normal_samples=random",
        "train.steps=6", "train.batch_size=4", "train.grad_accum=2", "train.lr=3e-3", "train.warmup_steps=2",
        "train.checkpoint_every=2", "train.progress=false", "train.keep_checkpoints=1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    root, model = setup
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(["unlearn", *_overrides(root, model, out)]) == 0
    return out


def _final_params(out: Path, model: Path):
    m = train.split_model(sga_jax.load_model(model, scan_layers=True))[1]  # as the run (model.scan_layers)
    return jax.tree.map(np.asarray, checkpoint.load_params(out / "checkpoints", m, step=6))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_stopped_and_resumed_run_matches_uninterrupted(setup, uninterrupted, tmp_path):
    root, model = setup
    full, split = uninterrupted, tmp_path / "split"
    # stopped after 3 steps (between checkpoints: the stop itself saves one), then resumed
    assert main(["unlearn", *_overrides(root, model, split), "train.stop_after=3"]) == 0
    assert (split / "checkpoints" / "3").is_dir() and not (split / "model").exists()
    assert [m["step"] for m in _metrics(split)] == [1, 2, 3]
    assert main(["unlearn", *_overrides(root, model, split)]) == 0

    a, b = _final_params(full, model), _final_params(split, model)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "time"} for m in ms]  # noqa: E731
    assert strip(_metrics(full)) == strip(_metrics(split))
    # the exported models are identical too
    assert (full / "model" / "model.safetensors").read_bytes() == (
        split / "model" / "model.safetensors"
    ).read_bytes()


def test_resume_refuses_a_changed_config(setup, uninterrupted):
    root, model = setup
    before = sorted(p.name for p in uninterrupted.rglob("*"))
    with pytest.raises(
        ConfigError, match=r"holds a run with a different config \(train.lr: 0.003 there, 0.01 now\)"
    ):
        runner.run(config.compose([], [*_overrides(root, model, uninterrupted), "train.lr=1e-2"]))
    assert sorted(p.name for p in uninterrupted.rglob("*")) == before


def test_killed_process_resumes_to_the_same_parameters(setup, uninterrupted, tmp_path):
    """SIGKILL a real `sga-jax unlearn` process once its second checkpoint exists, then resume."""
    root, model = setup
    full, killed = uninterrupted, tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    # slow the steps down (a sleep in the metrics log), so that the kill lands mid-run
    code = (
        "import sys, time; import sga_jax.train as T; w = T.MetricsLog.write\n"
        "def slow(self, rec): w(self, rec); time.sleep(0.5)\n"
        "T.MetricsLog.write = slow\n"
        "from sga_jax.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "unlearn", *_overrides(root, model, killed)], env=env
    )
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    assert main(["unlearn", *_overrides(root, model, killed)]) == 0
    a, b = _final_params(full, model), _final_params(killed, model)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_finished_run_keeps_only_the_exported_model_by_default(setup, uninterrupted, tmp_path):
    """train.keep_checkpoints defaults to 0: once a run has ended and exported its model, its Orbax
    checkpoints (parameters + optimizer state) are removed; keep_checkpoints=1 keeps the newest."""
    root, model = setup
    out = tmp_path / "default"
    args = [a for a in _overrides(root, model, out) if not a.startswith("train.keep_checkpoints")]
    assert main(["unlearn", *args, "train.steps=2"]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == ["6"]
