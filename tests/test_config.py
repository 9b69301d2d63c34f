"""Config composition and validation: every user mistake is one ConfigError line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sga_jax import config as C
from sga_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_composes(path):
    cfg = C.compose([path], ["model.path=some/model"])
    assert isinstance(cfg, C.RunConfig)
    assert C.to_yaml(cfg)  # round-trips to YAML


def test_defaults_files_and_overrides_compose_in_order():
    cfg = C.compose(
        [ROOT / "configs/experiment/tofu_sga.yaml"], ["model.path=/m", "method.r=-2", "train.lr=3e-5"]
    )
    assert isinstance(cfg.method, C.SGAConfig)
    assert (cfg.method.r, cfg.method.k) == (-2.0, 4)
    assert cfg.data.forget == "forget05" and cfg.data.retain == "retain95"
    assert cfg.train.lr == 3e-5 and cfg.train.batch_size == 32
    assert cfg.output_dir == "runs/tofu_forget05_sga"


def test_group_choice_replaces_the_method_section():
    cfg = C.compose([], ["method=sga", "method.r=0.5", "method=npo", "method.beta=0.2"])
    assert isinstance(cfg.method, C.NPOConfig) and cfg.method.beta == 0.2
    gru = C.compose([], ["method=gru_sga", "method.momentum=0.5", "method.r=-4"])
    assert gru.method.name == "gru" and gru.method.base == "sga"
    assert (gru.method.momentum, gru.method.r) == (0.5, -4.0)
    assert C.compose([], ["method=sga_paper_r"]).method.rate == "paper"
    assert C.compose([], ["method=sga_min_norm_r"]).method.rate == "min_norm"


def test_sga_weights_from_the_paper_are_representable():
    # r = -0.8, K = 4 -> forget weight 1.6, normal weight 0.2 (docs/design.md); r = 1 is the upper end.
    m = C.compose([], ["method.r=1", "method.k=4"]).method
    assert m.r == 1.0


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method.name=sgaa"], "unknown method 'sgaa' (did you mean 'sga'?)"),
        (["method=nope"], "method=nope: no such method config"),
        (["train.lrr=1e-5"], "unknown config key 'train.lrr' in train (did you mean 'train.lr'?)"),
        (["method.beta=0.1"], "unknown config key 'method.beta'"),
        (["mehtod.r=1"], "unknown config key 'mehtod'"),
        (["method.r=1.5"], "method.r: the smoothing rate must be <= 1"),
        (["method.k=0"], "method.k: K"),
        (["method.k=four"], "method.k: wrong type or value 'four'"),
        (["train.lr=-1"], "train.lr: must be a positive number"),
        (["train.batch_size=6", "train.grad_accum=4"], "train.grad_accum: must divide train.batch_size (6)"),
        (["model.dtype=fp8"], "model.dtype"),
        (["model=hf_dir"], "model.path: is required"),
        (["method=flat", "method.divergence=wasserstein"], "unknown f-divergence 'wasserstein'"),
        (["method.name=gru"], "method.base: GRU needs a base method"),
        (["train.steps"], "is not of the form key=value"),
        (["benchmark.forget=x"], "'benchmark' is not a config section"),
        (["eval.benchmark=glue"], "eval.benchmark"),
    ],
)
def test_bad_input_is_one_clear_line(overrides, needle):
    with pytest.raises(ConfigError) as info:
        C.compose([], overrides)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        C.compose([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        C.compose([bad])
    loop = tmp_path / "loop.yaml"
    loop.write_text("defaults: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        C.compose([loop])


def test_cli_config_error_exit_code_and_single_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sga_jax.cli", "unlearn", f"output_dir={out}", "method.r=2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["sga-jax: error: method.r: the smoothing rate must be <= 1 (arXiv 2510.22376), got 2.0"]
    assert not out.exists()


# ------------------------------------------------------------- user errors through `sga-jax` (in-process)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["unlearn", "method=sgaa"], "method=sgaa: no such method config (did you mean 'sga'?)"),
        (["unlearn", "method.name=gradascent"], "method.name: unknown method 'gradascent'"),
        (["unlearn", "trian.lr=1e-5"], "unknown config key 'trian'"),
        (["unlearn", "train.learning_rate=1e-5"], "unknown config key 'train.learning_rate' in train"),
        (["unlearn", "method.r=1.5"], "method.r: the smoothing rate must be <= 1"),
        (["unlearn", "train.steps=ten"], "train.steps: wrong type or value 'ten'"),
        (
            ["unlearn", "benchmark=jsonl", "data.forget=/nonexistent/forget.jsonl", "method=ga"],
            "data.forget: data file not found: /nonexistent/forget.jsonl",
        ),
        (
            ["unlearn", "benchmark=jsonl", "data.forget={forget}", "data.retain=/nonexistent/r.jsonl"],
            "data.retain: data file not found: /nonexistent/r.jsonl",
        ),
        (
            ["unlearn", "benchmark=tofu_forget01", "data.data_dir=/nonexistent/data"],
            "data.data_dir: not a directory: /nonexistent/data",
        ),
        (
            ["finetune", "benchmark=jsonl", "data.forget={forget}", "model.path=/nonexistent/model"],
            "model.path: /nonexistent/model does not exist",
        ),
        (["unlearn", "-c", "/nonexistent/exp.yaml"], "config file not found: /nonexistent/exp.yaml"),
        (["finetune", "mode=unlearn"], "mode=unlearn in the config, but the command is `sga-jax finetune`"),
        (["sweep", "benchmark=tofu_forget01", "sweep=[method=ga,method=nope]"], "sweep[1] 'method=nope'"),
        (
            ["eval", "{forget}", "--benchmark", "glue", "--out", "{out}"],
            "--benchmark: unknown benchmark 'glue'",
        ),
        (["eval", "/nonexistent/model", "--benchmark", "tofu", "--out", "{out}"], "model not found"),
        (["convert", "/nonexistent/model.gguf", "{out}"], "convert: source not found"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2_nothing_written(args, needle, tmp_path, capsys):
    from sga_jax.cli import main

    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"question": "Q?", "answer": "A."}\n')
    out = tmp_path / "out"
    args = [a.format(forget=forget, out=out) for a in args]
    if args[0] in ("unlearn", "finetune", "sweep"):
        args.append(f"output_dir={out}")
    before = sorted(tmp_path.rglob("*"))
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sga-jax: error: "), lines
    assert needle in lines[0], lines[0]
    assert not out.exists()
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere
