"""Hostile output folders, damaged checkpoints and interrupted runs (issue 11): a refused run writes
nothing and leaves the folder as it was; a damaged checkpoint is detected and skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_models import write_tiny_llama_for

from sga_jax import config
from sga_jax.checkpoint import Checkpointer
from sga_jax.cli import main
from sga_jax.fsutil import FolderLock


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("hostile_runs")
    path, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny")
    rows = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is number {i * 7}."} for i in range(4)]
    (root / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def _args(root: Path, model: Path, out, *extra: str) -> list[str]:
    return [
        "unlearn", "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"model.path={model}",
        f"output_dir={out}", "method=ga", "train.steps=3", "train.batch_size=4", "train.lr=1e-3",
        "train.checkpoint_every=1", "train.progress=false", *extra,
    ]  # fmt: skip


def _err(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "warning" not in x]
    assert len(err) == 1 and err[0].startswith("sga-jax: error: "), err
    return err[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_kfade_folder_is_not_overwritten(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "kfade"
    (out / "model").mkdir(parents=True)
    kfade = config.compose([], _args(root, model, out)[1:] + ["method=kfade"])
    (out / "config.yaml").write_text(config.to_yaml(kfade))
    (out / "delta.safetensors").write_bytes(b"delta")
    (out / "model" / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 0, "forget_nll": 1.0}\n')
    before = _snapshot(out)
    assert main(_args(root, model, out)) == 2
    assert "different config" in _err(capsys)
    assert _snapshot(out) == before


def test_a_folder_with_run_files_but_no_config_is_refused(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "odd"
    (out / "model").mkdir(parents=True)
    assert main(_args(root, model, out)) == 2
    assert "no config.yaml" in _err(capsys)


def test_model_inside_output_dir_is_refused(setup, tmp_path, capsys):
    root, model = setup
    assert main(_args(root, model, model.parent)) == 2
    assert "inside output_dir" in _err(capsys)


def test_unparseable_config_yaml_is_refused(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "bad"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("method: [unclosed\n")
    assert main(_args(root, model, out)) == 2
    assert "config.yaml cannot be read" in _err(capsys)
    assert (out / "config.yaml").read_text() == "method: [unclosed\n"


def test_a_held_lock_is_named(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "locked"
    out.mkdir()
    with FolderLock(out):
        assert main(_args(root, model, out)) == 2
    assert f'in use by {{"pid": {os.getpid()}' in _err(capsys)
    assert not (out / "metrics.jsonl").exists()


def test_starting_model_above_the_bound_is_named(setup, tmp_path, capsys):
    root, model = setup
    assert main(_args(root, model, tmp_path / "low", "train.max_forget_nll=0.5")) == 2
    err = _err(capsys)
    assert "starting model already fails the guard" in err and "checkpoint_every" not in err


def test_guard_keeps_a_good_checkpoint_with_keep_1(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "keep1"
    # GA at lr 1.0 (huge for Adam): the forget NLL passes 20 within a few steps (test_divergence.py)
    extra = ["train.steps=30", "train.lr=1.0", "train.warmup_steps=10", "train.schedule=constant",
             "train.max_grad_norm=null", "train.max_forget_nll=20", "train.keep_checkpoints=1"]  # fmt: skip
    assert main(_args(root, model, out, *extra)) == 2
    err = _err(capsys)
    assert "diverged at step" in err and "last good checkpoint:" in err, err
    ckpt = Checkpointer(out / "checkpoints")
    steps = ckpt.all_steps()
    ckpt.close()
    bad = int(err.split("diverged at step ")[1].split(":")[0])
    assert steps == [bad - 2], steps  # the newest one the guard measured good


def test_damaged_checkpoint_and_cut_metrics_line_resume(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "flip"
    old = os.umask(0o022)
    try:
        assert main(_args(root, model, out, "train.stop_after=2", "train.keep_checkpoints=3")) == 0
    finally:
        os.umask(old)
    assert (out / "config.yaml").stat().st_mode & 0o777 == 0o644  # the user's umask, not mkstemp's 0600
    biggest = max(
        (p for p in (out / "checkpoints" / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-line
    capsys.readouterr()
    # the same folder spelt relative to the working directory: the same run
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(_args(root, model, Path("flip"), "train.keep_checkpoints=3")) == 0
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "checkpoint" in err and "damaged" in err and "falling back to step 1" in err, err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps


def test_disk_full_during_a_checkpoint_keeps_the_earlier_ones(setup, tmp_path, capsys, monkeypatch):
    """A full disk while Orbax writes checkpoint 2: one line naming that checkpoint, the space it needs
    and the space left; checkpoint 1 stays and verifies; no partial step folder, no exported model."""
    import errno

    import orbax.checkpoint as ocp

    root, model = setup
    out = tmp_path / "full"
    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step >= 2:  # tensorstore's fault arrives wrapped in Orbax's own exception
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as inner:
                raise RuntimeError("Error writing checkpoint") from inner
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert main(_args(root, model, out, "train.keep_checkpoints=3")) == 2
    err = _err(capsys)
    assert str(out / "checkpoints" / "2") in err and "No space left on device" in err, err
    assert "it needs about" in err and "MiB free" in err, err
    assert not (out / "model").exists()
    ckpt = Checkpointer(out / "checkpoints")
    try:
        assert ckpt.all_steps() == [1] and ckpt.verify(1)
    finally:
        ckpt.close()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("2")) == []


def test_sweep_checks_every_entry_before_the_first_run(setup, tmp_path, capsys):
    """A missing model in the second entry is reported before the first run (or the starting model's
    evaluation) writes anything."""
    root, model = setup
    out = tmp_path / "sweep"
    missing = tmp_path / "no_such_model"
    args = ["sweep", "benchmark=tofu_forget01", f"model.path={model}", f"output_dir={out}", "train.steps=1",
            "train.progress=false", f"sweep=[method=ga,'method=ga model.path={missing}']"]  # fmt: skip
    assert main(args) == 2
    err = _err(capsys)
    assert err.startswith("sga-jax: error: sweep[1]") and str(missing) in err, err
    assert not out.exists()
