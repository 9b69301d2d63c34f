"""Hostile model files and destinations (issue 11): each case ends in seconds with one line naming the
problem (exit code 2 from the CLI), and nothing the user had is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import write_tiny_llama_for

import sga_jax
from sga_jax.cli import main
from sga_jax.errors import ModelLoadError
from sga_jax.fsutil import EXPORT_MARKER
from sga_jax.reapply import FORMAT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer) -> Path:
    # With a tokenizer beside it: convert refuses a source it could not turn into a usable directory.
    path, _ = write_tiny_llama_for(smollm2_tokenizer, tmp_path_factory.mktemp("hostile") / "tiny")
    return path


@pytest.fixture
def copy(tiny, tmp_path):
    def make(name: str = "m") -> Path:
        return Path(shutil.copytree(tiny, tmp_path / name))

    return make


@pytest.fixture
def deadline():
    """Turn a hang into a failure: SIGALRM after 10 s."""

    def boom(*_):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _one_line_error(capsys, *fragments: str) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("sga-jax: error: "), err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


def _edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------- 1. destinations


def test_convert_refuses_a_users_folder_and_keeps_its_files(tiny, tmp_path, capsys):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("precious")
    assert main(["convert", str(tiny), str(dst)]) == 2
    _one_line_error(capsys, "non-empty folder", "--overwrite")
    assert (dst / "notes.txt").read_text() == "precious"
    assert main(["convert", str(tiny), str(dst), "--overwrite"]) == 0
    assert (dst / EXPORT_MARKER).is_file() and not (dst / "notes.txt").exists()
    # a previous export of ours may be replaced without --overwrite
    assert main(["convert", str(tiny), str(dst)]) == 0


def test_convert_never_deletes_the_source(tiny, tmp_path, capsys):
    proj = tmp_path / "proj"
    src = Path(shutil.copytree(tiny, proj / "tiny"))
    before = sorted(p.name for p in src.iterdir())
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(src), str(proj), *extra]) == 2
        _one_line_error(capsys, "contains the source")
        assert main(["convert", str(src), str(src), *extra]) == 2
        _one_line_error(capsys, "contains the source")
    assert sorted(p.name for p in src.iterdir()) == before


def test_export_uses_the_umask_and_leaves_no_temporary_folder(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        out = sga_jax.save_model(sga_jax.load_model(tiny), tmp_path / "out")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -------------------------------------------------------------------------- 4. index traversal


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_index_names_outside_the_folder_are_refused(copy, shard, deadline):
    m = copy()
    shutil.copy(m / "model.safetensors", m.parent / "outside.safetensors")
    names = list(load_file(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    with pytest.raises(ModelLoadError, match="plain file names|outside"):
        sga_jax.load_model(m)


@pytest.mark.parametrize("weight_map", [["a"], {"x": 3}, "model.safetensors"])
def test_index_weight_map_of_the_wrong_type(copy, weight_map):
    m = copy()
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="weight_map"):
        sga_jax.load_model(m)


# ------------------------------------------------------------------------------ 5, 6. hangs


def test_huge_layer_count_fails_fast(copy, deadline):
    m = copy()
    _edit_config(m, num_hidden_layers=10000)
    with pytest.raises(ModelLoadError, match="10000 layers but the checkpoint holds 2"):
        sga_jax.load_model(m)


def test_fifo_weights_are_refused(copy):
    # In a child process killed after 120 s: a reader blocked in open() inside native code
    # ignores SIGALRM, so a regression must fail here rather than hang the suite. (10 s was too
    # short for the child's imports alone on a loaded 2-core machine: load 10, 2026-12-03.)
    import subprocess
    import sys

    m = copy()
    (m / "model.safetensors").unlink()
    os.mkfifo(m / "model.safetensors")
    args = ["convert", str(m), str(m.parent / "o")]
    code = f"from sga_jax.cli import main; raise SystemExit(main({args!r}))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a regular file" in p.stderr, p.stderr


# ------------------------------------------------------------------------- 8, 9. wrong results


def test_integer_dtype_on_float_weights_is_refused(copy):
    m = copy()
    tensors = load_file(m / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].view(np.int32)
    save_file(tensors, m / "model.safetensors")
    with pytest.raises(ModelLoadError, match="'model.norm.weight' is stored as int32"):
        sga_jax.load_model(m)


def test_fewer_layers_than_stored_is_an_error(copy):
    m = copy()
    _edit_config(m, num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match="asks for 1 layers but the checkpoint holds 2"):
        sga_jax.load_model(m)


def test_unused_tensors_are_an_error(copy):
    m = copy()
    tensors = load_file(m / "model.safetensors")
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, m / "model.safetensors")
    with pytest.raises(ModelLoadError, match="does not use .*model.extra.weight"):
        sga_jax.load_model(m)


@pytest.mark.parametrize(
    "key,value",
    [("num_hidden_layers", -2), ("hidden_size", "abc"), ("hidden_size", -32), ("vocab_size", 32.5)],
)
def test_bad_sizes_are_one_line(copy, key, value, tmp_path, capsys):
    m = copy()
    _edit_config(m, **{key: value})
    assert main(["convert", str(m), str(tmp_path / "out")]) == 2
    _one_line_error(capsys, key, "whole number >= 1")
    assert not (tmp_path / "out").exists()


def test_unknown_activation_is_found_at_load(copy):
    m = copy()
    _edit_config(m, hidden_act="swishy")
    with pytest.raises(ModelLoadError, match="hidden_act='swishy' is not supported"):
        sga_jax.load_model(m)


def test_deeply_nested_config_json(copy, capsys, tmp_path):
    m = copy()
    (m / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["convert", str(m), str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "config.json")


# ---------------------------------------------------------------------------------- 10. reapply


def _delta(path: Path, value, *, extra: str = "{}", dtype=np.float32) -> Path:
    t = np.full((32,), value, dtype=dtype)
    save_file(
        {"model.norm.weight": t},
        str(path),
        metadata={"format": FORMAT, "model_type": "llama", "extra": extra},
    )
    return path


@pytest.mark.parametrize("kind", ["nan", "inf", "int", "bool", "scale_nan", "scale_inf", "bad_meta"])
def test_reapply_refuses_broken_deltas(tiny, tmp_path, capsys, kind):
    d = tmp_path / "delta.safetensors"
    scale = []
    if kind in ("nan", "inf"):
        _delta(d, float(kind))
    elif kind == "int":
        _delta(d, 1, dtype=np.int32)
    elif kind == "bool":
        _delta(d, True, dtype=np.bool_)
    elif kind == "bad_meta":
        _delta(d, 0.01, extra="{not json")
    else:
        _delta(d, 0.01)
        scale = ["--scale", kind.split("_")[1]]
    out = tmp_path / "out"
    assert main(["reapply", str(d), str(tiny), str(out), *scale]) == 2
    _one_line_error(capsys)
    assert not out.exists()


def test_reapply_refuses_a_users_folder(tiny, tmp_path, capsys):
    d = _delta(tmp_path / "delta.safetensors", 0.01)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["reapply", str(d), str(tiny), str(out)]) == 2
    _one_line_error(capsys, "non-empty folder")
    assert (out / "keep.txt").read_text() == "x"
    assert main(["reapply", str(d), str(tiny), str(tiny.parent)]) == 2  # would delete the model
    _one_line_error(capsys, "contains the source")


# ------------------------------------------------------------------------ 7. runaway chat template


def test_runaway_chat_template_is_stopped(smollm2_tokenizer, monkeypatch, deadline):
    from sga_jax.data import formatting
    from sga_jax.errors import DataError

    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", loops)
    monkeypatch.setattr(formatting, "CHAT_TEMPLATE_SECONDS", 1.0)
    fmt = formatting.PromptFormatter(smollm2_tokenizer, "chat")
    with pytest.raises(DataError, match="chat template took more than 1 s"):
        fmt.prompt_text("What is fact 1?")
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # the test's own deadline is still armed


# ------------------------------------------------------------------------- disk faults, leftovers


def test_disk_full_during_export_names_the_file(tiny, tmp_path, capsys, monkeypatch):
    import errno
    import io

    from sga_jax.models import hf

    class Full(io.FileIO):  # the disk fills after the header and 1 KiB of tensor data
        def write(self, b):
            if self.tell() + len(b) > 2048:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)

    monkeypatch.setattr(hf, "open", lambda path, mode: Full(path, mode), raising=False)
    out = tmp_path / "out"
    assert main(["convert", str(tiny), str(out)]) == 2
    err = _one_line_error(capsys, f"{out / 'model.safetensors'}: No space left on device", "MiB free")
    assert "the export needs" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_leftovers_of_a_killed_export_are_removed(tiny, tmp_path):
    import subprocess
    import sys

    from sga_jax.fsutil import PARTIAL_MARKER

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()
    folders = {}
    for name, pid in (("killed", dead.pid), ("live", os.getpid())):
        d = tmp_path / f".out.{name}"
        d.mkdir()
        (d / EXPORT_MARKER).write_text("x")
        (d / PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "host": host}))
        folders[name] = d
    users = tmp_path / ".out.mine"  # the user's own folder with a similar name: no marker
    users.mkdir()
    sga_jax.save_model(sga_jax.load_model(tiny), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.live", ".out.mine", "out"]
    assert not (tmp_path / "out" / PARTIAL_MARKER).exists()
