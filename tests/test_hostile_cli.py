"""User mistakes and I/O faults at the command line (issue 11): one line naming the problem, exit 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny_models import write_tiny_llama_for

from sga_jax import config, runner
from sga_jax.cli import main
from sga_jax.data import splits
from sga_jax.data.formatting import PromptFormatter
from sga_jax.errors import ConfigError, DataError
from sga_jax.eval import tofu


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.r=-inf", "method.r"),
        ("train.b1=5", "train.b1"),
        ("train.epochs=inf", "train.epochs"),
        ("train.seed=-1", "train.seed"),
        ('model.freeze=["("]', "model.freeze"),
    ],
)
def test_non_finite_and_out_of_range_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.compose([], ["method=sga", override])


def test_defaults_must_be_a_list(tmp_path):
    (tmp_path / "c.yaml").write_text("defaults: 5\n")
    with pytest.raises(ConfigError, match="defaults must be a list"):
        config.compose([tmp_path / "c.yaml"])


def test_output_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    rows = tmp_path / "forget.jsonl"
    rows.write_text('{"question": "q?", "answer": "a."}\n')
    args = ["unlearn", "benchmark=jsonl", f"data.forget={rows}", "model.path=smollm2", f"output_dir={f}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0], err
    assert f.read_text() == "mine"


def test_eval_out_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("mine")
    model = tmp_path / "m"
    model.mkdir()
    assert main(["eval", str(model), "--benchmark", "ppl", "--out", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sga-jax: error: ") and str(f) in err[0], err
    assert f.read_text() == "mine"


def test_forget_quality_needs_the_same_questions(data_dir, tmp_path):
    retain = data_dir / "tofu_eval_logs" / "phi-1.5_retain90"
    ours = tmp_path / "ours"
    shutil.copytree(retain, ours)
    log = json.loads((ours / "eval_log_forget.json").read_text())
    cut = {k: ({i: v[i] for i in list(v)[:200]} if isinstance(v, dict) else v) for k, v in log.items()}
    (ours / "eval_log_forget.json").write_text(json.dumps(cut))
    with pytest.raises(DataError, match="300 forget questions, this evaluation 200"):
        tofu.aggregate(ours, retain)


def _prepare_jsonl(tmp_path, tokenizer, forget, retain, *extra):
    path = tmp_path / "tiny"
    if not path.exists():
        write_tiny_llama_for(tokenizer, path)
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in forget))
    (tmp_path / "retain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in retain))
    cfg = config.compose(
        [],
        [
            "benchmark=jsonl", f"data.forget={tmp_path / 'forget.jsonl'}",
            f"data.retain={tmp_path / 'retain.jsonl'}", f"model.path={path}",
            f"output_dir={tmp_path / 'run'}", *extra,
        ],
    )  # fmt: skip
    return runner.prepare(cfg)


FACTS = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is {i * 7}."} for i in range(6)]


def test_forget_rows_in_retain_are_never_normal_samples(tmp_path, smollm2_tokenizer, capsys):
    """Forget copies spread through the retain file (rows 1, 3 and 5, one with a trailing space and a
    doubled space): none is an SGA normal sample, and the saved pairing names rows of the file."""
    near = {"question": FACTS[1]["question"] + " ", "answer": FACTS[1]["answer"].replace(" ", "  ", 1)}
    retain = [FACTS[3], FACTS[0], FACTS[4], near, FACTS[5], FACTS[2]]
    for how in ("random", "embedding"):
        prep = _prepare_jsonl(
            tmp_path, smollm2_tokenizer, FACTS[:3], retain, "method=sga", "method.k=3",
            f"method.normal_samples={how}",
        )  # fmt: skip
        assert "3 retain rows are also forget rows" in capsys.readouterr().err
        assert prep.data.retain["input_ids"].shape[0] == 3
        assert {j for row in prep.pairing for j in row} == {0, 2, 4}, prep.pairing


def test_graddiff_never_descends_a_forget_row(tmp_path, smollm2_tokenizer, capsys):
    """GradDiff ascends the forget rows: a copy of one in the retain file (here the last row, with a
    trailing space) is dropped from the retain set it descends, with the warning."""
    retain = [FACTS[3], FACTS[4], {**FACTS[0], "answer": FACTS[0]["answer"] + " "}]
    prep = _prepare_jsonl(tmp_path, smollm2_tokenizer, FACTS[:2], retain, "method=graddiff")
    assert "1 retain rows are also forget rows" in capsys.readouterr().err
    want = splits.encode(retain[:2], PromptFormatter(prep.tokenizer, "auto", 256), source="retain")
    got = prep.data.retain
    assert got["input_ids"].shape[0] == 2
    n = want["input_ids"].shape[1]
    np.testing.assert_array_equal(got["input_ids"][:, :n], want["input_ids"])


def test_empty_forget_answer_is_refused(tmp_path, smollm2_tokenizer):
    forget = [FACTS[0], {"question": "What is nothing?", "answer": "  "}]
    with pytest.raises(DataError, match="row 1 has an empty answer"):
        _prepare_jsonl(tmp_path, smollm2_tokenizer, forget, FACTS[3:], "method=graddiff")


def test_eval_checks_retain_logs_before_evaluating(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    out = tmp_path / "out"
    assert (
        main(["eval", str(model), "-b", "tofu", "--out", str(out), "--retain-logs", str(tmp_path / "no")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval-log folder not found" in err[0], err
    assert not out.exists()


def _one_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "warning" not in x.lower()]
    assert len(err) == 1 and err[0].startswith("sga-jax: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("hostile_cli")
    path, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny")
    rows = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is {i * 7}."} for i in range(4)]
    (root / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def _unlearn(root, model, out, *extra: str) -> list[str]:
    return [
        "unlearn", "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"model.path={model}",
        f"output_dir={out}", "method=ga", "train.steps=1", "train.batch_size=4", "train.progress=false",
        *extra,
    ]  # fmt: skip


def test_lone_surrogate_names_the_file_and_row(tiny_run, tmp_path, capsys):
    root, model = tiny_run
    rows = tmp_path / "odd.jsonl"
    rows.write_text('{"question": "q?", "answer": "a."}\n{"question": "What \\ud800?", "answer": "x"}\n')
    out = tmp_path / "run"
    assert main([*_unlearn(root, model, out), f"data.forget={rows}"]) == 2
    err = _one_line(capsys)
    assert str(rows) in err and "row 1 key 'question'" in err and "surrogate" in err, err
    assert not out.exists()


@pytest.mark.parametrize("option,key", [("foo=1", "'foo'"), ("limit=abc", "limit='abc'")])
def test_eval_bad_options_are_one_line(tiny_run, tmp_path, capsys, option, key):
    _, model = tiny_run
    out = tmp_path / "out"
    assert main(["eval", str(model), "-b", "ppl", "--out", str(out), option]) == 2
    assert key in _one_line(capsys)
    assert not out.exists()


def test_eval_options_and_retain_logs_of_a_run_are_checked_before_training(tiny_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="eval.options limit='abc'"):
        config.compose([], ["eval.benchmark=tofu", "eval.options={limit: abc}"])
    with pytest.raises(ConfigError, match="eval.options 'foo'"):
        config.compose([], ["eval.benchmark=ppl", "eval.options={foo: 1}"])
    root, model = tiny_run
    out = tmp_path / "run"
    args = _unlearn(root, model, out, "eval.benchmark=tofu", f"eval.retain_logs={tmp_path / 'none'}")
    assert main(args) == 2
    assert "eval.retain_logs" in _one_line(capsys)
    assert not out.exists()  # refused before the run, not after it


def test_float16_on_the_cpu_is_one_line(tiny_run, tmp_path, capsys):
    root, model = tiny_run
    out = tmp_path / "run"
    assert main(_unlearn(root, model, out, "model.dtype=float16")) == 2
    assert "model.dtype=float16 does not run on the CPU" in _one_line(capsys)
    assert not out.exists()


def test_distributed_without_a_coordinator_names_the_variables(tiny_run, tmp_path):
    # A fresh process: jax.distributed must start before any backend, which this one has.
    import os
    import subprocess
    import sys

    drop = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
            "OMPI_MCA_orte_hnp_uri", "SGA_JAX_NUM_PROCESSES", "SGA_JAX_PROCESS_ID")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in drop}
    root, model = tiny_run
    args = _unlearn(root, model, tmp_path / "run", "distributed=true")
    p = subprocess.run([sys.executable, "-m", "sga_jax.cli", *args], env=env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("sga-jax: error: "), p.stderr
    assert all(v in err[0] for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    assert not (tmp_path / "run").exists()


def test_retain_made_only_of_forget_rows_is_refused(tmp_path, smollm2_tokenizer):
    with pytest.raises(DataError, match="every retain row is also a forget row"):
        _prepare_jsonl(tmp_path, smollm2_tokenizer, FACTS[:2], FACTS[:2][::-1], "method=graddiff")
