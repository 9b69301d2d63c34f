"""TOFU (Maini et al. 2024, arXiv 2401.06121): fictitious-author QA for unlearning.

``load_tofu(config)`` returns a list of row dicts for every config of the benchmark, read from the
local data folder (``sga_jax.paths.data_root() / "tofu"``, the official files) or, with
``source="hub"``, from ``datasets.load_dataset("locuslab/TOFU", config)``.

Configs: ``forget01/05/10`` (and ``forgetXX_perturbed``, the same rows: the local files carry the
perturbed fields), ``retain90/95/99``, ``full`` (= retain90 followed by forget10, as TOFU's
"full" finetuning set), ``retain_perturbed``, ``real_authors_perturbed``, ``world_facts_perturbed``
and ``idontknow`` (refusal strings, rows ``{"text"}``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sga_jax.data.jsonl import Row, check_rows, read_records, strings_to_rows
from sga_jax.errors import DataError
from sga_jax.paths import data_root

HUB_NAME = "locuslab/TOFU"

_QA = {"question": str, "answer": str}
_PERTURBED = {**_QA, "paraphrased_answer": str, "perturbed_answer": list}
_OPTIONS = {**_QA, "perturbed_answer": list}

# config -> (local file, required keys, number of perturbed answers or None)
CONFIGS: dict[str, tuple[str, dict[str, Any], int | None]] = {
    **{f"forget{n}": (f"forget{n}.json", _QA, None) for n in ("01", "05", "10")},
    **{f"forget{n}_perturbed": (f"forget{n}.json", _PERTURBED, 5) for n in ("01", "05", "10")},
    **{f"retain{n}": (f"retain{n}.json", _QA, None) for n in ("90", "95", "99")},
    "retain_perturbed": ("retain_perturbed.json", _PERTURBED, 5),
    "real_authors_perturbed": ("real_authors_perturbed.json", _OPTIONS, 3),
    "world_facts_perturbed": ("world_facts_perturbed.json", _OPTIONS, 3),
    "idontknow": ("idontknow.jsonl", {"text": str}, None),
}
ALL_CONFIGS = (*CONFIGS, "full")

# Each forget split's complement, the retain split a run pairs with it by default.
RETAIN_FOR_FORGET = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}

# The four evaluation splits of TOFU's eval_everything.yaml: task -> (config, base answer key).
EVAL_TASKS: dict[str, tuple[str, str]] = {
    "eval_log": ("retain_perturbed", "paraphrased_answer"),
    "eval_real_author_wo_options": ("real_authors_perturbed", "answer"),
    "eval_real_world_wo_options": ("world_facts_perturbed", "answer"),
    "eval_log_forget": ("forget10_perturbed", "paraphrased_answer"),
}


def _local_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root = data_root()
    return root / "tofu" if (root / "tofu").is_dir() else root


def _read_idk(path: Path) -> list[Row]:
    # The official idontknow.jsonl is plain text, one refusal a line (not JSON despite its suffix).
    if not path.is_file():
        raise DataError(f"TOFU file not found: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return strings_to_rows(lines, source=str(path))


def _load_hub(config: str, repo: str | None = None) -> list[Row]:
    """``datasets.load_dataset(repo, config, split="train")``; ``repo``: the hub id (default
    :data:`HUB_NAME`) or a local folder holding a copy of that dataset repository."""
    repo = repo or HUB_NAME
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"source='hub' needs the `datasets` package: {e}") from None
    try:
        ds = datasets.load_dataset(repo, config, split="train")
    except Exception as e:
        raise DataError(
            f"cannot load {repo} config {config!r} with datasets: {' '.join(str(e).split())}"
        ) from None
    rows = [dict(r) for r in ds]
    if config == "idontknow" and rows and "text" not in rows[0]:
        key = next(iter(rows[0]))
        rows = [{"text": r[key]} for r in rows]
    return rows


def load_tofu(
    config: str,
    *,
    source: str = "local",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    hub_repo: str | None = None,
) -> list[Row]:
    """Rows of one TOFU config (see module docstring), checked: every row has the config's keys
    (``perturbed_answer`` with 5 items, 3 for real authors / world facts).

    ``source``: ``"local"`` (default; ``data_dir`` or ``$SGA_JAX_DATA_DIR/tofu``) or ``"hub"``
    (``datasets.load_dataset(hub_repo or "locuslab/TOFU", config)``).
    ``limit``: keep the first ``limit`` rows (TOFU's evaluation uses the first 300 of forget10 and of
    retain_perturbed).
    """
    if config == "full":
        kw: dict[str, Any] = dict(source=source, data_dir=data_dir, hub_repo=hub_repo)
        rows = load_tofu("retain90", **kw) + load_tofu("forget10", **kw)
        return rows[:limit] if limit is not None else rows
    if config not in CONFIGS:
        raise DataError(f"unknown TOFU config {config!r}; choose one of {', '.join(ALL_CONFIGS)}")
    filename, required, n_perturbed = CONFIGS[config]
    if source == "hub":
        rows = _load_hub(config, hub_repo)
        where = f"{hub_repo or HUB_NAME}/{config}"
    elif source == "local":
        path = _local_dir(data_dir) / filename
        if not path.is_file():
            raise DataError(f"TOFU split file not found: {path} (set SGA_JAX_DATA_DIR or use source='hub')")
        rows = _read_idk(path) if config == "idontknow" else read_records(path)
        where = str(path)
    else:
        raise DataError(f"unknown data source {source!r}; use 'local' or 'hub'")
    if limit is not None:
        if limit <= 0:
            raise DataError(f"limit must be positive, got {limit}")
        rows = rows[:limit]
    lengths = {"perturbed_answer": n_perturbed} if n_perturbed else None
    return check_rows(rows, required, source=where, list_lengths=lengths)


def load_idontknow(**kwargs: Any) -> list[str]:
    """TOFU's refusal templates ("I don't know" answers) as plain strings."""
    return [r["text"] for r in load_tofu("idontknow", **kwargs)]
