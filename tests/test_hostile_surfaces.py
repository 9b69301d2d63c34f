"""Hostile inputs on the newer surfaces (issue 24): eval destinations, links inside output_dir,
re-exports, LoRA adapters, non-finite results, overlaps, late errors. Each case ends with one line
naming the problem (exit code 2) or the right result, and the user's files stay as they were."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hostile import one_error_line as _err
from hostile import snapshot as _snapshot
from tiny_models import write_tiny_llama_for

from sga_jax.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("hostile_surfaces")
    path, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny")
    rows = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is number {i * 7}."} for i in range(4)]
    (root / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "texts.jsonl").write_text(
        "".join(json.dumps({"text": f"fact {i} is {i}"}) + "\n" for i in range(3))
    )
    return root, path


def _args(root: Path, model: Path, out, *extra: str) -> list[str]:
    return [
        "unlearn", "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"model.path={model}",
        f"output_dir={out}", "method=ga", "train.steps=2", "train.batch_size=4", "train.lr=1e-3",
        "train.checkpoint_every=1", "train.progress=false", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- data loss: eval --out


def test_eval_out_never_holds_the_retain_logs(setup, data_dir, tmp_path, capsys):
    _, model = setup
    logs = Path(shutil.copytree(data_dir / "tofu_eval_logs" / "phi-1.5_retain90", tmp_path / "proj" / "RL"))
    before = _snapshot(logs)
    for out in (logs, logs.parent):  # the retain logs as --out, or inside it
        argv = ["eval", str(model), "-b", "tofu_forget01", "--out", str(out), "--retain-logs", str(logs)]
        assert main([*argv, "--overwrite"]) == 2
        _err(capsys, "--retain-logs", "inside --out")
    assert _snapshot(logs) == before


def test_eval_out_keeps_a_users_results(setup, tmp_path, capsys):
    _, model = setup
    root, _ = setup
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"mine": 1}')
    argv = ["eval", str(model), "-b", "ppl", f"data={root / 'texts.jsonl'}", "--out", str(out)]
    assert main(argv) == 2
    _err(capsys, "non-empty folder", "--overwrite")
    assert (out / "results.json").read_text() == '{"mine": 1}'
    # an evaluation of ours may be redone in its folder; a file the user adds there makes it theirs
    fresh = tmp_path / "ours"
    assert main([*argv[:-1], str(fresh)]) == 0
    assert main([*argv[:-1], str(fresh)]) == 0
    (fresh / "NOTES.md").write_text("mine")
    assert main([*argv[:-1], str(fresh)]) == 2
    _err(capsys, "NOTES.md")
    assert main([*argv[:-1], str(fresh), "--overwrite"]) == 0
    assert (fresh / "NOTES.md").read_text() == "mine"  # eval writes its files, it removes nothing


# ----------------------------------------------------------------------- data loss: re-export


def test_re_export_keeps_files_the_user_added(setup, tmp_path, capsys):
    _, model = setup
    dst = tmp_path / "export"
    assert main(["convert", str(model), str(dst)]) == 0
    assert main(["convert", str(model), str(dst)]) == 0  # ours alone: replaced
    (dst / "NOTES.md").write_text("precious")
    (dst / "eval").mkdir()
    (dst / "eval" / "results.json").write_text("{}")
    before = _snapshot(dst)
    assert main(["convert", str(model), str(dst)]) == 2
    _err(capsys, "sga_jax did not write", "--overwrite")
    assert _snapshot(dst) == before


# ------------------------------------------------------------------ data loss: links in output_dir


def test_lock_and_metrics_log_refuse_links(tmp_path):
    from sga_jax.errors import ConfigError
    from sga_jax.fsutil import FolderLock
    from sga_jax.metrics_log import MetricsLog

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        FolderLock(run).acquire()
    (run / "metrics.jsonl").symlink_to(victim)
    for resume_step in (0, 5):
        with pytest.raises(ConfigError, match="symbolic link"):
            MetricsLog(run / "metrics.jsonl", resume_step)
    assert victim.read_text() == "precious\n" and (run / "metrics.jsonl").is_symlink()


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "eval", "checkpoints"])
def test_a_run_never_writes_through_a_link_in_output_dir(setup, tmp_path, capsys, name):
    root, model = setup
    out = tmp_path / "run"
    assert main(_args(root, model, out, "train.stop_after=1")) == 0
    victim = tmp_path / "victim"
    if name in ("eval", "checkpoints"):
        victim.mkdir()
        (victim / "keep.txt").write_text("precious")
        shutil.rmtree(out / name, ignore_errors=True)
    else:
        victim.write_text("precious")
        (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(victim)
    capsys.readouterr()
    assert (
        main(_args(root, model, out, "eval.benchmark=ppl", f"eval.options={{data: {root / 'texts.jsonl'}}}"))
        == 2
    )
    _err(capsys, "symbolic link", name)
    if victim.is_dir():
        assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    else:
        assert victim.read_text() == "precious"


# ------------------------------------------------------------- silently wrong: hub data in eval


def test_the_runs_evaluation_reads_the_users_hub_copy(setup, data_dir, tmp_path, monkeypatch):
    """``data.source=hub data.hub_repo=DIR``: the run's own TOFU evaluation reads DIR too (offline:
    the public hub cannot be reached, so ignoring DIR fails)."""
    import datasets

    from sga_jax import config as C
    from sga_jax.eval.run import evaluate
    from sga_jax.runner import eval_options

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "TOFU"
    repo.mkdir()
    from sga_jax.data.tofu import load_tofu

    lines = ["---", "configs:"]
    for name in ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        lines += [f"- config_name: {name}", f"  data_files: {name}.json"]
        rows = load_tofu(name, data_dir=data_dir / "tofu", limit=2)
        (repo / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "README.md").write_text("\n".join([*lines, "---", ""]))
    _, model = setup
    cfg = C.compose(
        [], ["data.source=hub", f"data.hub_repo={repo}", "eval.benchmark=tofu", "eval.options={limit: 2}"]
    )
    opts = eval_options(cfg)
    assert opts["hub_repo"] == str(repo)
    res = evaluate(
        "tofu", model, tmp_path / "eval", **opts, max_new_tokens=2, generation_max_length=64, progress=False
    )
    assert res["options"]["hub_repo"] == str(repo) and res["model_utility"] is not None


# ---------------------------------------------------------------------------------- reapply


def test_reapply_refuses_a_scale_that_overflows_the_model(setup, tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    from sga_jax.reapply import FORMAT

    _, model = setup
    d = tmp_path / "delta.safetensors"
    meta = {"format": FORMAT, "model_type": "llama", "extra": "{}"}
    save_file({"model.norm.weight": np.full((32,), 0.01, np.float32)}, str(d), metadata=meta)
    out = tmp_path / "out"
    assert main(["reapply", str(d), str(model), str(out), "--scale", "1e40"]) == 2
    _err(capsys, "NaN or inf", "model.norm.weight", "--scale")
    assert not out.exists()


# ------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def adapter(setup, tmp_path_factory):
    from sga_jax.models import hf
    from sga_jax.models.lora import LoRAConfig, apply_lora, save_adapter

    _, model = setup
    m = apply_lora(hf.load_model(model), LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"]))
    old = os.umask(0o022)
    try:
        return save_adapter(m, tmp_path_factory.mktemp("adapter") / "a")
    finally:
        os.umask(old)


def test_adapter_export_uses_the_umask(adapter):
    assert {p.name: p.stat().st_mode & 0o777 for p in adapter.iterdir()} == {
        ".sga_jax_export": 0o644, "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644,
    }  # fmt: skip


def _break_adapter(folder: Path, kind: str) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    if kind in ("nan", "inf"):
        tensors[first] = np.full_like(tensors[first], float(kind))
    elif kind == "int":
        tensors[first] = tensors[first].astype(np.int32)
    elif kind == "header":
        weights.write_bytes(b"\xff" * 8 + b"{not a header")
        return
    else:
        key, value = {"alpha_inf": ("lora_alpha", float("inf")), "r_frac": ("r", 4.9), "r_str": ("r", "4"),
                      "alpha_str": ("lora_alpha", "8"), "dropout_str": ("lora_dropout", "0.1"),
                      "r_huge": ("r", 10**9)}[kind]  # fmt: skip
        cfg[key] = value
        cfg_file.write_text(json.dumps(cfg))
        return
    save_file(tensors, str(weights), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "kind,message",
    [("nan", "NaN or inf"), ("inf", "NaN or inf"), ("int", "int32"), ("header", "not a readable safetensors"),
     ("alpha_inf", "lora_alpha=inf"), ("r_frac", "r=4.9"), ("r_str", "r='4'"),
     ("alpha_str", "lora_alpha='8'"), ("dropout_str", "lora_dropout='0.1'"),
     ("r_huge", "larger than the smallest projection")],
)  # fmt: skip
def test_load_adapter_refuses_nonsense_and_attaches_nothing(setup, adapter, tmp_path, kind, message):
    import time

    from sga_jax.errors import SgaJaxError
    from sga_jax.models import hf
    from sga_jax.models.lora import has_lora, load_adapter

    _, model = setup
    bad = Path(shutil.copytree(adapter, tmp_path / "bad"))
    _break_adapter(bad, kind)
    m = hf.load_model(model)
    t0 = time.perf_counter()
    with pytest.raises(SgaJaxError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        load_adapter(m, bad)
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 5
    assert not has_lora(m)  # a refused load leaves the model as it was
    load_adapter(m, adapter)  # and the good adapter still loads onto it
    assert has_lora(m)


def test_huge_lora_rank_in_a_run_fails_before_allocating(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "run"
    assert main(_args(root, model, out, "model.lora.rank=1000000000")) == 2
    _err(capsys, "LoRA rank 1000000000", "smallest projection")
    assert not out.exists()


# ------------------------------------------------------- silently wrong: NaN results, OPT context


def test_a_nan_model_fails_its_evaluation_in_one_line(setup, tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    root, model = setup
    bad = Path(shutil.copytree(model, tmp_path / "nan"))
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"][0] = np.nan
    save_file(tensors, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    assert main(["eval", str(bad), "-b", "ppl", f"data={root / 'texts.jsonl'}", "--out", str(out)]) == 2
    _err(capsys, "perplexity=nan", "not finite")
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_opt(setup, tmp_path_factory, smollm2_tokenizer):
    """A tiny OPT (learned positions, 32 of them) that speaks SmolLM2's tokenizer."""
    from tiny_models import write_tiny_hf

    t = smollm2_tokenizer
    path, _ = write_tiny_hf(
        "opt", tmp_path_factory.mktemp("opt") / "opt", vocab_size=len(t), max_position_embeddings=32,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
    )  # fmt: skip
    t.save_pretrained(path)
    return path


def test_opt_rows_past_its_positions_are_refused_up_front(setup, tiny_opt, tmp_path, capsys):
    root, _ = setup
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": " ".join(f"word{i}" for i in range(60))}) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_opt), "-b", "ppl", f"data={long}", "--out", str(out)]) == 2
    _err(capsys, "learned positions for only 32", "max_length")
    assert not out.exists()
    run = tmp_path / "run"
    rows = tmp_path / "forget.jsonl"
    rows.write_text(
        json.dumps({"question": "What is the long fact?", "answer": " ".join(["fact"] * 60)}) + "\n"
    )
    assert main(_args(root, tiny_opt, run, f"data.forget={rows}", "train.batch_size=1")) == 2
    err = _err(capsys, "data.forget rows", "learned positions for only 32", "data.max_length")
    assert "max_forget_nll" not in err and not run.exists()


# ---------------------------------------------------------------- checkpoints without checksums


@pytest.mark.parametrize("damage", ["deleted", "unreadable"])
def test_a_checkpoint_without_a_readable_checksum_is_not_trusted(setup, tmp_path, capsys, damage):
    root, model = setup
    out = tmp_path / "run"
    assert (
        main(_args(root, model, out, "train.steps=3", "train.stop_after=2", "train.keep_checkpoints=3")) == 0
    )
    sums = out / "checkpoints" / "checksums.json"
    if damage == "deleted":
        sums.unlink()
    else:
        sums.write_text("{not json")
    biggest = max(
        (p for p in (out / "checkpoints" / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_args(root, model, out, "train.steps=3", "train.keep_checkpoints=3")) == 2
    err = capsys.readouterr().err
    assert "no readable checksum" in err and "no intact checkpoint" in err, err
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------- late errors


def test_retain_logs_of_another_split_are_refused_before_the_model_loads(setup, data_dir, tmp_path, capsys):
    from sga_jax import config as C
    from sga_jax.errors import ConfigError
    from sga_jax.runner import check_before_training

    root, model = setup
    logs = data_dir / "tofu_eval_logs" / "phi-1.5_retain90"  # forget10, 300 questions
    out = tmp_path / "out"
    argv = ["eval", str(model), "-b", "tofu_forget01", "--out", str(out), "--retain-logs", str(logs)]
    assert main(argv) == 2
    _err(capsys, "300 forget questions, this evaluation 40")
    assert not out.exists()
    assert main([*argv[:3], "tofu", *argv[4:], "limit=10"]) == 2
    _err(capsys, "300 forget questions, this evaluation 10")
    cfg = C.compose([], ["data.forget=forget01", "eval.benchmark=tofu", f"eval.retain_logs={logs}"])
    with pytest.raises(ConfigError, match="eval.retain_logs: .*300 forget questions, this evaluation 40"):
        check_before_training(cfg)


def test_generate_false_gives_every_number_but_model_utility(setup, tmp_path):
    _, model = setup
    out = tmp_path / "out"
    assert main(["eval", str(model), "-b", "tofu_forget01", "--out", str(out), "limit=2", "generate=false",
                 "progress=false"]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["model_utility"] is None and res["retain_rougeL"] is None
    assert 0 < res["retain_prob"] < 1 and 0 <= res["forget_truth_ratio"] <= 1


def test_negative_max_forget_nll_is_refused_when_the_config_is_read(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "run"
    assert main(_args(root, model, out, "train.max_forget_nll=-1")) == 2
    _err(capsys, "train.max_forget_nll", "must be > 0")
    assert not out.exists()
