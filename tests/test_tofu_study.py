"""The TOFU study driver (benchmarks/tofu_study.py) end to end at toy scale: a tiny random Llama over
SmolLM2's vocabulary (written here), the real TOFU files, every method of the study's config, 1-2
steps each; then a second invocation that must skip every finished run without retraining."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from tiny_models import write_tiny_llama_for

from sga_jax.data.tofu import load_tofu

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "tofu_study.yaml"


def _driver():
    spec = importlib.util.spec_from_file_location("tofu_study", ROOT / "benchmarks" / "tofu_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tofu_study"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, smollm2_tokenizer, data_dir):
    root = tmp_path_factory.mktemp("study")
    tiny, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny", max_position_embeddings=512)
    args = ["--scale", "toy", "--base-model", str(tiny), "--out", str(root / "results"),
            "--runs-dir", str(root / "runs"), "--data-dir", str(data_dir)]  # fmt: skip
    driver = _driver()
    assert driver.main(args) == 0
    return driver, root, args


def test_toy_study_writes_table_plots_manifest(study_run, data_dir):
    driver, root, _ = study_run
    study = driver.load_study(CONFIG, scale="toy")
    results = root / "results"
    for f in ("results.md", "fq_vs_mu.png", "trajectories.png", "manifest.json", "memorisation.json"):
        assert (results / f).is_file(), f
    for f in ("fq_vs_mu.png", "trajectories.png"):
        assert (results / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (results / "results.md").read_text().splitlines()
    # every method x seed of the config is a row, plus the retain and target models
    want = [("retain", 0), ("target", 0)] + [(m["name"], m.get("seeds", [0])[0]) for m in study["methods"]]
    got = [tuple(c.strip() for c in line.strip("|").split("|")[:2]) for line in table[2:]]
    assert got == [(m, str(s)) for m, s in want]
    assert len({m for m, _ in want}) >= 14  # retain, target + the 12 methods of the issue
    # every unlearned row has a Forget Quality (against the retain logs) and a Model Utility
    manifest = json.loads((results / "manifest.json").read_text())
    runs = {r["name"]: r for r in manifest["runs"]}
    for name, r in runs.items():
        assert r["model_utility"] is not None and 0 <= r["model_utility"] <= 1, name
        if name != "retain_seed0" and r["method"] != "retain":
            assert r["forget_quality"] is not None and 0 <= r["forget_quality"] <= 1, name
    assert manifest["versions"]["jax"] and manifest["seeds"]["data"] == study["data"]["seed"]
    assert manifest["data"]["rows"] == {
        "forget": 4,
        "retain_subset": 8,
        "target_finetune": 12,
        "retain_finetune": 8,
    }
    assert "train:" in (results / "configs" / "ga_seed0.yaml").read_text()
    # per-epoch evaluation of the per_epoch methods: step 0 and each of the 2 steps; step 0 is the
    # unchanged target, whose evaluation is reused rather than run again
    epochs = runs["ga_seed0"]["epochs"]
    assert [e["step"] for e in epochs] == [0, 1, 2]
    assert [e["epoch"] for e in epochs] == [0, 0.5, 1.0]  # batch 2 of the 4 forget rows
    assert not (root / "runs" / "ga_seed0" / "epochs" / "step0").exists()
    assert epochs[0]["forget_quality"] == runs["target"]["forget_quality"]
    assert (root / "runs" / "ga_seed0" / "epochs" / "step1" / "eval_log_forget.json").is_file()
    # the last step's evaluation is the run's own (not evaluated twice)
    assert not (root / "runs" / "ga_seed0" / "epochs" / "step2").exists()
    assert epochs[-1]["model_utility"] == runs["ga_seed0"]["model_utility"]
    assert runs["graddiff_seed0"]["epochs"] == []
    # the data files are what the study says: forget01's first rows, a seeded retain99 subset
    forget = [json.loads(x) for x in (root / "runs" / "data" / "forget.jsonl").read_text().splitlines()]
    target = [
        json.loads(x) for x in (root / "runs" / "data" / "target_finetune.jsonl").read_text().splitlines()
    ]
    assert target[: len(forget)] == forget and len(forget) == 4
    # the retain rows the evaluation scores (the first `limit` of the retain split) are finetuned on
    retain_file = root / "runs" / "data" / "retain_subset.jsonl"
    retain = [json.loads(x) for x in retain_file.read_text().splitlines()]
    pool = load_tofu("retain99", data_dir=data_dir / "tofu")
    assert manifest["data"]["retain_indices"][:3] == [0, 1, 2] and len(retain) == 8
    want_questions = [pool[i]["question"] for i in manifest["data"]["retain_indices"]]
    assert [r["question"] for r in retain] == want_questions
    assert target[len(forget) :] == retain


def test_second_invocation_skips_finished_runs(study_run, capsys):
    driver, root, args = study_run
    weights = sorted((root / "runs").glob("*/model/model.safetensors"))
    assert len(weights) == 14
    before = {p: p.stat().st_mtime_ns for p in weights}
    capsys.readouterr()
    assert driver.main(args) == 0
    err = capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in weights} == before  # nothing retrained or re-exported
    names = re.findall(r"tofu_study: skip (\S+) \(finished", err)
    assert len(names) == len(weights) and "ga_seed0" in names


def test_resume_with_another_base_model_is_refused(study_run, tmp_path, capsys):
    """Every finished run descends from a target finetuned from the first base model: a second
    invocation with another --base-model must not reuse them (before: all 14 were skipped as done)."""
    driver, root, args = study_run
    other = tmp_path / "other"
    other.mkdir()
    swapped = [str(other) if a == args[args.index("--base-model") + 1] else a for a in args]
    weights = sorted((root / "runs").glob("*/model/model.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in weights}
    capsys.readouterr()
    assert driver.main(swapped) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds runs finetuned from base model" in err and str(other) in err
    assert "skip" not in err and {p: p.stat().st_mtime_ns for p in weights} == before


def test_base_model_record_of_the_finished_target(tmp_path):
    driver = _driver()
    runs = tmp_path / "runs"
    assert driver.base_model_mismatch(runs, "any") is None  # nothing finished yet
    (runs / "target").mkdir(parents=True)
    (runs / "target" / driver.RESULT).write_text("{}")
    (runs / "target" / "config.yaml").write_text(f"model:\n  path: {tmp_path / 'base'}\n")
    (tmp_path / "base").mkdir()
    assert driver.base_model_mismatch(runs, str(tmp_path / "base")) is None
    assert driver.base_model_mismatch(runs, str(tmp_path / "sub" / ".." / "base")) is None
    assert "finetuned from base model" in driver.base_model_mismatch(runs, "smollm2")
    (runs / "target" / "config.yaml").write_text("model: [")
    assert "cannot be read" in driver.base_model_mismatch(runs, str(tmp_path / "base"))


def test_target_that_has_not_memorised_stops_the_study(study_run, capsys):
    driver, root, args = study_run
    capsys.readouterr()
    # every run is finished: the second pass reads them back, checks the target and stops there
    assert driver.main([*args, "--set", "study.memorisation.stop=true"]) == 1
    err = capsys.readouterr().err
    assert "has not memorised forget01" in err and "stopped before unlearning" in err
    assert "skip ga_seed0" not in err  # nothing after the target was reached
    memo = json.loads((root / "results" / "memorisation.json").read_text())
    assert memo["memorised"] is False and memo["warnings"]


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    driver = _driver()
    out, runs = tmp_path / "r", tmp_path / "runs"
    assert driver.main(["--dry-run", "--out", str(out), "--runs-dir", str(runs)]) == 0
    text = capsys.readouterr().out
    names = ["retain", "target", "ga_seed1", "sga_r-4_seed0", "sga_r-0.8_seed1", "sga_paper_r_seed0"]
    names += ["flat_seed0", "gru_ga_seed0", "gru_sga_seed0", "kfade_seed0", "npo_seed0", "simnpo_seed0"]
    for name in names:
        assert f" {name} " in text, name
    # every method's first seed before any second seed: a study stopped early has a row per method
    assert text.index(" kfade_seed0 ") < text.index(" ga_seed1 ") < text.index(" sga_r-0.8_seed1 ")
    assert not out.exists() and not runs.exists()
