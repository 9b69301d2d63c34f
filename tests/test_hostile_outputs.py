"""Hostile inputs on what sga_jax writes (issue 24, second pass): retain logs reached through an
eval option, NaN models on every benchmark, files written through links or predictable temporary
names, re-exports into folders of an older export. Each case ends with one line naming the problem
(exit code 2) or the right result, and the user's files stay as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hostile import one_error_line as _err
from hostile import snapshot as _snapshot
from tiny_models import write_tiny_llama_for

from sga_jax.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("hostile_outputs")
    path, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny")
    (root / "texts.jsonl").write_text(
        "".join(json.dumps({"text": f"fact {i} is {i}"}) + "\n" for i in range(3))
    )
    return root, path


# ------------------------------------------------------------- retain logs as an eval option


@pytest.fixture
def earlier_eval(data_dir, tmp_path):
    """A retain model's TOFU logs in a folder an earlier `sga-jax eval` wrote (its marker lists them),
    so that --out may replace it without --overwrite."""
    from sga_jax.fsutil import write_marker

    logs = Path(shutil.copytree(data_dir / "tofu_eval_logs" / "phi-1.5_retain90", tmp_path / "RL"))
    write_marker(logs)
    return logs


def test_retain_logs_given_as_an_option_are_never_inside_out(setup, earlier_eval, tmp_path, capsys):
    from sga_jax import config as C
    from sga_jax.errors import ConfigError
    from sga_jax.eval.run import evaluate
    from sga_jax.runner import check_before_training

    _, model = setup
    before = _snapshot(earlier_eval)
    quick = ["limit=1", "max_new_tokens=1", "forget_split=forget10", "progress=false"]
    for out in (earlier_eval, earlier_eval.parent):
        argv = ["eval", str(model), "-b", "tofu", "--out", str(out), f"retain_logs={earlier_eval}", *quick]
        assert main(argv) == 2
        _err(capsys, "--retain-logs", "inside --out")
    with pytest.raises(ConfigError, match="inside the output folder"):  # the Python entry point too
        evaluate("tofu", model, earlier_eval, retain_logs=str(earlier_eval), limit=1, max_new_tokens=1,
                 forget_split="forget10", progress=False)  # fmt: skip
    assert _snapshot(earlier_eval) == before
    run = tmp_path / "run"  # a run's own evaluation folder, named through eval.options
    logs = f"eval.options.retain_logs={run / 'eval'}"
    cfg = C.compose([], [f"output_dir={run}", "eval.benchmark=tofu", logs])
    with pytest.raises(ConfigError, match="inside the run's evaluation folder"):
        check_before_training(cfg)


# ------------------------------------------------------------------- NaN models, every benchmark


@pytest.mark.parametrize("bench", ["mia", "wmdp"])
def test_a_nan_model_fails_mia_and_wmdp_in_one_line(setup, tmp_path, capsys, bench):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    root, model = setup
    bad = Path(shutil.copytree(model, tmp_path / "nan"))
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"][0] = np.nan
    save_file(tensors, str(bad / "model.safetensors"))
    texts, out = root / "texts.jsonl", tmp_path / "out"
    wmdp = root / "wmdp.jsonl"
    row = {"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 1}
    wmdp.write_text("".join(json.dumps(row) + "\n" for _ in range(2)))
    opts = [f"members={texts}", f"nonmembers={texts}"] if bench == "mia" else [f"data={wmdp}"]
    # mia was a sklearn ValueError traceback (--out left behind); wmdp an accuracy of " A", exit 0
    assert main(["eval", str(bad), "-b", bench, *opts, "--out", str(out)]) == 2
    _err(capsys, "not finite")
    assert not out.exists()


# ------------------------------------------------------------------- links at temporary names


def test_results_are_never_written_through_a_link_at_the_temporary_name(tmp_path):
    import os

    from sga_jax.data.jsonl import write_json_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    out = tmp_path / "eval"
    out.mkdir()
    (out / f".results.json.tmp{os.getpid()}").symlink_to(victim)  # the name it used to write through
    write_json_atomic({"a": 1}, out / "results.json", indent=2, allow_nan=False)
    assert victim.read_text() == "the user's file"
    assert json.loads((out / "results.json").read_text()) == {"a": 1}


def test_sweep_and_demo_reports_are_never_written_through_links(tmp_path):
    """sweep.md / sweep.png and the demo's probabilities.png: a link at the final name or at the
    temporary name they used to write (``.NAME.tmp.png``) is replaced, never written through."""
    from sga_jax import demo, sweep

    victims = {}
    out = tmp_path / "out"
    out.mkdir()
    names = ["sweep.md", "sweep.png", ".sweep.png.tmp.png", "probabilities.png", ".probabilities.png.tmp.png"]
    for name in names:
        victims[name] = tmp_path / f"victim_{name.strip('.')}"
        victims[name].write_text("the user's file")
        (out / name).symlink_to(victims[name])
    rows = [{"run": "ga", "forget_quality": 0.5, "model_utility": 0.4}]
    sweep._write(out, rows)
    history = [{"step": s, "forget_prob": 0.5 - s / 10, "retain_prob": 0.6} for s in (0, 2)]
    demo.plot(history, out / "probabilities.png", history[0], sizes=(1, 1))
    assert all(v.read_text() == "the user's file" for v in victims.values())
    for name in ("sweep.md", "sweep.png", "probabilities.png"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
