"""A run's output folder: checked before anything is written, locked while a run writes, files
written whole (a temporary file renamed into place)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sga_jax import config as C
from sga_jax.errors import ConfigError
from sga_jax.fsutil import FolderLock, atomic_write_text, refuse_link, remove_stale_partials
from sga_jax.train import BOOKKEEPING

# What a run writes into its output_dir: a folder holding any of these holds a run.
RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "checkpoints", "model", "delta.safetensors",
                 "normal_samples.json", "eval")  # fmt: skip


def resume_key(cfg: C.RunConfig) -> dict[str, Any]:
    """The parts of a config that must match for a run to continue another's folder."""
    d = C.to_dict(cfg)
    for k in BOOKKEEPING:
        d["train"].pop(k, None)
    d["method"].pop("recipe", None)  # only its train values count, and they are compared
    for k in ("eval", "sweep", "distributed", "output_dir"):  # output_dir: the folder itself, however spelt
        d.pop(k, None)
    return d


def check_output_dir(cfg: C.RunConfig) -> Path:
    """Refuse, before anything is written, an output_dir that is a file, that holds the model being
    trained, or that holds another run (a different config, or an unreadable one) unless
    ``train.resume=false`` asks to start that folder afresh. Returns the folder."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    model = Path(cfg.model.path).expanduser()
    if model.exists() and out.resolve() in (model.resolve(), *model.resolve().parents):
        raise ConfigError(
            f"model.path {model} is inside output_dir {out}: the run would overwrite its own input; "
            "use another output_dir"
        )
    for name in (*RUN_ARTEFACTS, ".lock", "tensorboard"):  # never written through a link
        refuse_link(out / name, "output_dir entry")
    found = [a for a in RUN_ARTEFACTS if (out / a).exists()]
    if not found:
        return out
    saved = out / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"output_dir {out} holds {found[0]} but no config.yaml (not a run sga_jax can continue); "
            "use another output_dir"
        )
    try:
        old = C.compose(base=OmegaConf.load(saved))
    except Exception as e:  # YAML / schema errors: without it we cannot tell whether configs match
        msg = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"output_dir {out}: its config.yaml cannot be read ({msg}); use another output_dir"
        ) from None
    if cfg.train.resume and resume_key(old) != resume_key(cfg):
        diff = _first_difference(resume_key(old), resume_key(cfg))
        raise ConfigError(
            f"output_dir {out} holds a run with a different config ({diff}); use another output_dir "
            "or train.resume=false"
        )
    return out


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} there, {b!r} now"


def start_afresh(out: Path) -> None:
    """``train.resume=false``: remove the previous run's artefacts (checked to be a run of ours)."""
    for name in RUN_ARTEFACTS[1:]:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


@contextlib.contextmanager
def locked(out: Path) -> Iterator[Path]:
    """Create ``out`` and hold its lock while the run writes (two runs would interleave files)."""
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):
        remove_stale_partials(out / "model")  # what a run killed during its export left
        yield out


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file renamed into place (:func:`sga_jax.fsutil.atomic_write_text`)."""
    atomic_write_text(path, text)
