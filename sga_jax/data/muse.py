"""MUSE-News (Shi et al. 2024, arXiv 2407.06460): BBC news unlearning benchmark.

Local layout (the official MUSE repository's ``data/news``)::

    knowmem/{forget_qa,retain2_qa,forget_qa_icl,retain2_qa_icl}.json   [{question, answer}]
    verbmem/forget.json                                                [{prompt, gt}]
    privleak/{forget,holdout,retain2}.json                             [str]
    raw/forget.json (+ retain1 / retain2 / holdout where available)    [str]

``source="hub"`` reads the same splits from ``muse-bench/MUSE-News`` (configs ``knowmem``,
``verbmem``, ``privleak``, ``raw``; the hub names the retain QA split ``retain_qa``).
"""

from __future__ import annotations

import os
from pathlib import Path

from sga_jax.data.jsonl import Row, check_rows, read_records, strings_to_rows
from sga_jax.errors import DataError
from sga_jax.paths import data_root

HUB_NAME = "muse-bench/MUSE-News"

KNOWMEM_SPLITS = {"forget": "forget_qa", "retain": "retain2_qa", "retain2": "retain2_qa"}
PRIVLEAK_SPLITS = ("forget", "holdout", "retain", "retain2")
RAW_SPLITS = ("forget", "retain1", "retain2", "holdout")


def _root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root = data_root()
    return root / "muse_news" if (root / "muse_news").is_dir() else root


def _file(data_dir, *parts: str) -> Path:
    path = _root(data_dir).joinpath(*parts)
    if not path.is_file():
        raise DataError(f"MUSE-News split file not found: {path} (set SGA_JAX_DATA_DIR or use source='hub')")
    return path


def _hub(config: str, split: str, repo: str | None = None) -> list[Row]:
    """``datasets.load_dataset(repo, config, split=split)``; ``repo``: the hub id (default
    :data:`HUB_NAME`) or a local folder holding a copy of that dataset repository."""
    repo = repo or HUB_NAME
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        raise DataError(
            f"cannot load {repo} {config}/{split} with datasets: {' '.join(str(e).split())}"
        ) from None
    return [dict(r) for r in ds]


def _limit(rows: list, limit: int | None) -> list:
    if limit is None:
        return rows
    if limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    return rows[:limit]


def load_knowmem(
    split: str = "forget",
    *,
    icl: bool = False,
    source: str = "local",
    data_dir=None,
    limit=None,
    hub_repo=None,
) -> list[Row]:
    """KnowMem QA rows ``{question, answer}`` of ``split`` ("forget" or "retain"), or its
    in-context few-shot examples when ``icl``."""
    if split not in KNOWMEM_SPLITS:
        raise DataError(f"unknown KnowMem split {split!r}; use 'forget' or 'retain'")
    name = KNOWMEM_SPLITS[split] + ("_icl" if icl else "")
    if source == "hub":
        rows, where = (
            _hub("knowmem", name.replace("retain2", "retain"), hub_repo),
            f"{HUB_NAME}/knowmem/{name}",
        )
    else:
        path = _file(data_dir, "knowmem", f"{name}.json")
        rows, where = read_records(path), str(path)
    return check_rows(_limit(rows, limit), {"question": str, "answer": str}, source=where)


def load_verbmem(*, source: str = "local", data_dir=None, limit=None, hub_repo=None) -> list[Row]:
    """VerbMem rows ``{prompt, gt}``: the start of a forget article and its true continuation."""
    if source == "hub":
        rows, where = _hub("verbmem", "forget", hub_repo), f"{HUB_NAME}/verbmem/forget"
    else:
        path = _file(data_dir, "verbmem", "forget.json")
        rows, where = read_records(path), str(path)
    return check_rows(_limit(rows, limit), {"prompt": str, "gt": str}, source=where)


def load_privleak(
    split: str, *, source: str = "local", data_dir=None, limit=None, hub_repo=None
) -> list[Row]:
    """PrivLeak texts ``{text}`` of ``split``: "forget" (members), "holdout" (non-members), "retain"."""
    if split not in PRIVLEAK_SPLITS:
        raise DataError(f"unknown PrivLeak split {split!r}; use one of {PRIVLEAK_SPLITS}")
    if source == "hub":
        hub_split = "retain" if split == "retain2" else split
        rows, where = _hub("privleak", hub_split, hub_repo), f"{HUB_NAME}/privleak/{hub_split}"
    else:
        local = "retain2" if split == "retain" else split
        path = _file(data_dir, "privleak", f"{local}.json")
        rows, where = read_records(path), str(path)
    return strings_to_rows(_limit(rows, limit), source=where)


def load_raw(
    split: str = "forget", *, source: str = "local", data_dir=None, limit=None, hub_repo=None
) -> list[Row]:
    """A raw MUSE-News corpus ``{text}`` (the forget corpus by default)."""
    if split not in RAW_SPLITS:
        raise DataError(f"unknown raw split {split!r}; use one of {RAW_SPLITS}")
    if source == "hub":
        rows, where = _hub("raw", split, hub_repo), f"{HUB_NAME}/raw/{split}"
    else:
        path = _file(data_dir, "raw", f"{split}.json")
        rows, where = read_records(path), str(path)
    return strings_to_rows(_limit(rows, limit), source=where)
