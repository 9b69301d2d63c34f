"""The divergence guard: gradient ascent with a huge learning rate is stopped with one clear line
(exit code 2) and the last good checkpoint stays loadable; its parameters are finite and its forget
NLL is within the bound."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_models import write_tiny_llama_for

from sga_jax import checkpoint, config, logprobs, runner, train
from sga_jax.cli import main
from sga_jax.errors import DivergenceError

BOUND = 20.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    tok = smollm2_tokenizer
    root = tmp_path_factory.mktemp("diverge")
    path, _ = write_tiny_llama_for(tok, root / "tiny")
    rows = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is number {i * 7}."} for i in range(4)]
    (root / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def _overrides(root, model, out, *extra):
    # GA, lr warming up to 1.0 (huge for Adam) over 10 steps, a checkpoint after every step: the forget
    # NLL goes 10.9, 10.9, 10.8, 15.7, 31.0 ... the guard fires at step 5; checkpoint 3 is the last good.
    return [
        "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"model.path={model}", f"output_dir={out}",
        "method=ga", "train.steps=30", "train.batch_size=4", "train.lr=1.0", "train.warmup_steps=10",
        "train.schedule=constant", "train.max_grad_norm=null", f"train.max_forget_nll={BOUND}",
        "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.progress=false", *extra,
    ]  # fmt: skip


def test_guard_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path, capsys):
    root, model_dir = setup
    out = tmp_path / "run"
    assert main(["unlearn", *_overrides(root, model_dir, out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sga-jax: error: training diverged at step "), err
    assert f"> train.max_forget_nll = {BOUND:g}" in err[0] and "last good checkpoint:" in err[0]
    assert not (out / "model").exists()  # nothing exported from a diverged run

    bad_step = int(err[0].split("diverged at step ")[1].split(":")[0])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["forget_nll"] <= BOUND for m in metrics) and len(metrics) == bad_step - 1

    # the checkpoint named in the message is the newest left, and loads
    ckpt = checkpoint.Checkpointer(out / "checkpoints")
    good = ckpt.latest_step()
    ckpt.close()
    assert good is not None and good < bad_step and f"(step {good})" in err[0]
    cfg = config.compose([], _overrides(root, model_dir, out))
    prep = runner.prepare(cfg)  # the run's own model structure (scanned layers) and forget batch
    start = float(np.mean(logprobs.batched_nll(prep.model, prep.data.forget)))
    graphdef, params, rest = train.split_model(prep.model)
    restored = checkpoint.load_params(out / "checkpoints", params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
    # its parameters are the ones the guard measured good: forget NLL within the bound
    good_model = nnx.merge(graphdef, restored, rest)
    nll = float(np.mean(logprobs.batched_nll(good_model, prep.data.forget)))
    assert start < nll <= BOUND  # it had ascended, but not past the bound


def test_nan_is_caught_in_process(setup, tmp_path):
    root, model_dir = setup
    cfg = config.compose(
        [], _overrides(root, model_dir, tmp_path / "nan", "train.lr=1e30", "train.max_forget_nll=null")
    )
    with pytest.raises(DivergenceError, match=r"diverged (at|after) step \d+: .*(nan|inf|NaN)"):
        runner.run(cfg)
