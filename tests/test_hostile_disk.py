"""A full disk during a run (issue 24): one line naming the disk that is full (the run's folder and
its mount) and the space left on it, never Orbax's thread tracebacks, never the free space of the
current directory's disk. No real full disk: the writes are made to fail with ``ENOSPC`` and
``shutil.disk_usage`` tells a small disk (the run's) from a large one (everything else)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from tiny_models import write_tiny_llama_for

from sga_jax.checkpoint import Checkpointer
from sga_jax.cli import main

SMALL, LARGE = 8 * 2**20, 70 * 2**30  # free bytes: the run's disk, every other disk


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("hostile_disk")
    path, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny")
    rows = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is number {i * 7}."} for i in range(4)]
    (root / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def _args(root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "unlearn", "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"model.path={model}",
        f"output_dir={out}", "method=ga", "train.steps=3", "train.batch_size=4", "train.lr=1e-3",
        "train.checkpoint_every=1", "train.progress=false", "train.keep_checkpoints=3", *extra,
    ]  # fmt: skip


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """``tmp_path / "disk"`` is a small disk with 8 MiB free; every other path is on a large one.
    The test runs from another folder (the current directory is on the large disk)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    real = shutil.disk_usage

    def disk_usage(path):
        total, used, _ = real(path)
        p = Path(path).resolve()
        return type(real(path))(total, used, SMALL if p == disk or disk in p.parents else LARGE)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return disk


def _mount(path: Path) -> Path:
    return next(p for p in [path, *path.parents] if os.path.ismount(p))


def _one_line(capsys, caplog) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("sga-jax: error: "), err
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not logged, [r.getMessage()[:200] for r in logged]  # no Orbax tracebacks either
    return err[0]


def test_full_disk_inside_orbax_names_that_disk_and_no_traceback(
    setup, small_disk, capsys, caplog, monkeypatch
):
    """The write of checkpoint 2 fails inside Orbax's serialisation thread, as tensorstore's does on a
    full disk: Orbax logs the fault with its traceback from each thread; the user sees one line naming
    checkpoint 2, the space it needs, the run's disk and its 8 MiB (not the 70 GiB of the current
    directory's disk). Checkpoint 1 stays and verifies, no partial step is left."""
    from orbax.checkpoint._src.serialization import serialization

    root, model = setup
    out = small_disk / "run"
    real = serialization.async_serialize_from_host

    async def write(*args, **kwargs):
        if (out / "checkpoints" / "1").is_dir():  # checkpoint 1 is written, 2 meets a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(*args, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", write)
    caplog.set_level(logging.INFO)
    assert main(_args(root, model, out)) == 2
    err = _one_line(capsys, caplog)
    assert str(out / "checkpoints" / "2") in err and "No space left on device" in err, err
    assert "it needs about" in err and f"{SMALL / 2**20:.1f} MiB free" in err, err
    assert f"mounted at {_mount(small_disk)}" in err, err
    ckpt = Checkpointer(out / "checkpoints")
    try:
        assert ckpt.all_steps() == [1] and ckpt.verify(1)
    finally:
        ckpt.close()
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("2")]
    assert not (out / "model").exists()


def test_full_disk_writing_the_metrics_log_names_that_disk(setup, small_disk, capsys, caplog, monkeypatch):
    """A write to ``metrics.jsonl`` that fails with a bare ``ENOSPC`` (a buffered write names no
    file): the line names ``metrics.jsonl`` and the run's disk, not the current directory's."""
    from sga_jax import metrics_log

    root, model = setup
    out = small_disk / "run"

    class FullDisk:  # a file whose writes fail as a full disk's do, naming no file
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def close(self):
            pass

    real = metrics_log.MetricsLog.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self._file.close()
        self._file = FullDisk()

    monkeypatch.setattr(metrics_log.MetricsLog, "__init__", init)
    assert main(_args(root, model, out)) == 2
    err = _one_line(capsys, caplog)
    assert f"{out / 'metrics.jsonl'}: No space left on device" in err, err
    assert f"{SMALL / 2**20:.1f} MiB free" in err and f"mounted at {_mount(small_disk)}" in err, err


def test_a_bare_disk_fault_names_the_output_dir(setup, small_disk, capsys, caplog, monkeypatch):
    """An ``ENOSPC`` with no file name from anywhere in the run is reported on ``output_dir``'s disk."""
    from sga_jax import runner

    root, model = setup
    out = small_disk / "run"

    def run(cfg):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runner, "run", run)
    assert main(_args(root, model, out)) == 2
    err = _one_line(capsys, caplog)
    assert f"{out}: No space left on device" in err and f"{SMALL / 2**20:.1f} MiB free" in err, err


def test_full_disk_writing_a_small_file_names_it(small_disk, monkeypatch):
    """``config.yaml``, markers, checksums: a write that fails with a bare ``ENOSPC`` in
    ``atomic_write_text`` names the file it was writing, and leaves no temporary file."""
    from sga_jax import fsutil

    class FullDisk:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil.os, "fdopen", FullDisk)
    target = small_disk / "config.yaml"
    with pytest.raises(OSError) as e:
        fsutil.atomic_write_text(target, "a: 1\n")
    line = fsutil.describe_os_error(e.value)
    assert line.startswith(f"{target}: No space left on device"), line
    assert f"{SMALL / 2**20:.1f} MiB free on the disk of {small_disk}" in line, line
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize(
    "code,text",
    [(errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
     (errno.EFBIG, "File too large")],
)  # fmt: skip
def test_tensorstores_own_disk_faults_are_recognised(tmp_path, caplog, monkeypatch, code, text):
    """tensorstore reports an OS fault as ``ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='N']")``
    (its text, as a real full disk gave it): a quota or file-size fault is one ``OSError`` naming the
    checkpoint too, not a traceback, and its Orbax logs are dropped."""
    import jax.numpy as jnp
    from orbax.checkpoint._src.serialization import serialization

    async def write(*args, **kwargs):
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "{tmp_path}": '
            f"Failed to write 4030464 bytes to file 9: {text} [os_error_code='{code}']"
        )

    monkeypatch.setattr(serialization, "async_serialize_from_host", write)
    caplog.set_level(logging.INFO)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        with pytest.raises(OSError) as e:
            ckpt.save(1, {"params": {"w": jnp.ones((4, 4))}}, {"step": 1})
        assert ckpt.all_steps() == []
    assert e.value.errno == code and e.value.filename == str(tmp_path / "checkpoints" / "1"), e.value
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


_REAL_FAULT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
import jax
from sga_jax.checkpoint import Checkpointer
from sga_jax.fsutil import describe_os_error
state = {"params": {f"w{i}": jax.random.normal(jax.random.key(i), (1024, 1024)) for i in range(8)}}
with Checkpointer(sys.argv[1]) as ckpt:
    try:
        ckpt.save(1, state, {"step": 1})
    except OSError as e:
        print("sga-jax: error:", describe_os_error(e), file=sys.stderr)
        sys.exit(2)
"""


def test_a_real_write_fault_in_tensorstore_is_one_line_and_leaves_nothing(tmp_path):
    """A real fault from the kernel, in a child process: a 1 MiB file-size limit (``ulimit -f``;
    EFBIG, down the same tensorstore path as a full disk's ENOSPC) under a 32 MiB checkpoint. Before:
    Orbax's logged tracebacks, then one ``RuntimeError('Event loop is closed')`` traceback per
    write still in flight, and an empty ``1.orbax-checkpoint-tmp`` tree recreated by those writes
    after the partial step was removed. Now: one line, and the checkpoint folder is empty."""
    import subprocess
    import sys

    ckpts = tmp_path / "checkpoints"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _REAL_FAULT, str(ckpts)], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert err[0].startswith(f"sga-jax: error: {ckpts / '1'}: File too large writing checkpoint 1"), err
    assert "it needs about 32.0 MiB" in err[0] and "ulimit -f" in err[0], err
    assert [p.name for p in ckpts.iterdir()] == [], list(ckpts.rglob("*"))


def test_a_killed_saves_temporary_folder_is_removed_when_the_run_resumes(setup, tmp_path, capsys):
    """A save killed mid-write leaves Orbax's ``<step>.orbax-checkpoint-tmp`` (its space stays taken):
    the run that resumes the folder (holding its lock) removes it; the checkpoints stay."""
    root, model = setup
    out = tmp_path / "run"
    assert main(_args(root, model, out, "train.stop_after=1")) == 0
    partial = out / "checkpoints" / "9.orbax-checkpoint-tmp"  # a step this run will not save again
    shutil.copytree(out / "checkpoints" / "1", partial)
    assert main(_args(root, model, out)) == 0
    assert not partial.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2", "3", "checksums.json"]
