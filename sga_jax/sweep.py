"""``sga-jax sweep``: several unlearning runs from one base config, then TOFU's Forget Quality vs
Model Utility scatter (``sweep.png``) and a markdown table (``sweep.md``).

The base config (files + overrides) lists the runs under ``sweep:``, each entry a string of
overrides applied on top of it (``"method=sga method.r=-2.0"``). Every entry is composed and
validated before the first run starts, so a typo in the fifth entry is reported at once and nothing
is written. Run ``i`` goes to ``<output_dir>/<i>_<slug>``; its results are ``runner.run``'s TOFU
evaluation (``eval.benchmark: tofu``, forced).

``eval.retain_logs`` names the retain model's TOFU eval-log folder (Forget Quality is the KS-test
p-value against it); it may also name the retain model itself (an HF directory), which is then
evaluated once into ``<output_dir>/retain_eval``. The starting model (``model.path``) is evaluated
too and drawn as the "original" point. Without retain logs the plot's y axis is the forget-set truth
ratio score instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sga_jax import config as C
from sga_jax import runner
from sga_jax.data.jsonl import write_json_atomic
from sga_jax.data.splits import load_rows
from sga_jax.errors import ConfigError, SgaJaxError
from sga_jax.eval.run import evaluate
from sga_jax.fsutil import atomic_save_figure, atomic_write_text
from sga_jax.models.locate import resolve_model_path
from sga_jax.rundir import check_output_dir


@dataclasses.dataclass
class SweepResult:
    output_dir: Path
    rows: list[dict[str, Any]]
    table_path: Path
    plot_path: Path


def _slug(entry: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.\-]+", "_", entry.replace("method=", "").replace("method.", "")).strip("_")
    return s[:60] or "run"


def plan(
    files: Sequence[str | Path], overrides: Sequence[str]
) -> tuple[C.RunConfig, list[tuple[str, C.RunConfig]]]:
    """The base config and one validated :class:`~sga_jax.config.RunConfig` per sweep entry."""
    base = C.compose(files, overrides)
    if not base.sweep:
        raise ConfigError(
            'sweep: the config lists no runs (sweep: ["method=ga", "method=sga method.r=-0.8", ...])'
        )
    if base.mode != "unlearn":
        raise ConfigError(f"mode: a sweep runs unlearning methods, got mode={base.mode}")
    if base.data.benchmark != "tofu":
        raise ConfigError(
            f"data.benchmark: a sweep plots TOFU forget quality vs utility, got {base.data.benchmark!r}"
        )
    root = Path(base.output_dir)
    runs = []
    for i, entry in enumerate(base.sweep):
        try:
            items = shlex.split(entry)
        except ValueError as e:
            raise ConfigError(f"sweep[{i}]: cannot split {entry!r}: {e}") from None
        try:
            cfg = C.compose(
                files,
                [*overrides, *items, f"output_dir={root / f'{i}_{_slug(entry)}'}", "eval.benchmark=tofu"],
            )
        except ConfigError as e:
            raise ConfigError(f"sweep[{i}] {entry!r}: {e}") from None
        cfg.sweep = []
        runs.append((entry, cfg))
    return base, runs


def _retain_logs(base: C.RunConfig, root: Path) -> str | None:
    """The retain model's eval-log folder: ``eval.retain_logs`` itself, or its evaluation when it
    names a model directory (evaluated into ``root/retain_eval``)."""
    spec = base.eval.retain_logs
    if not spec:
        return None
    p = Path(spec).expanduser()
    if (p / "eval_log_forget.json").is_file():
        return str(p)
    if (p / "config.json").is_file() or p.suffix == ".gguf":
        opts = runner.eval_options(
            dataclasses.replace(base, eval=dataclasses.replace(base.eval, benchmark="tofu"))
        )
        opts.pop("retain_logs", None)
        out = root / "retain_eval"
        if not (out / "eval_log_forget.json").is_file():
            evaluate("tofu", str(p), out, **opts)
        return str(out)
    raise ConfigError(f"eval.retain_logs: {p} is neither a TOFU eval-log folder nor a model directory")


def sweep(files: Sequence[str | Path], overrides: Sequence[str] = ()) -> SweepResult:
    """Run every entry of the config's ``sweep`` list; write ``sweep.md``, ``sweep.json`` and
    ``sweep.png`` into the base ``output_dir``."""
    base, runs = plan(files, overrides)
    # Check every entry's model, data files and output folder before anything is written: a typo
    # in the fifth entry must not wait for four runs to finish.
    resolve_model_path(base.model.path)
    for i, (entry, cfg) in enumerate(runs):
        try:
            resolve_model_path(cfg.model.path)
            load_rows(cfg.data, need_retain=False)
            check_output_dir(cfg)
        except SgaJaxError as e:
            raise type(e)(f"sweep[{i}] {entry!r}: {e}") from None
    spec = base.eval.retain_logs
    if spec and not Path(spec).expanduser().exists():
        raise ConfigError(f"eval.retain_logs: not found: {spec}")

    root = Path(base.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    retain_logs = _retain_logs(base, root)
    first = runs[0][1]
    opts = runner.eval_options(first)
    opts.pop("retain_logs", None)
    if retain_logs:
        opts["retain_logs"] = retain_logs
    rows: list[dict[str, Any]] = []
    original = evaluate("tofu", resolve_model_path(base.model.path), root / "original_eval", **opts)
    rows.append({"run": "original", **_row(original)})
    for entry, cfg in runs:
        if retain_logs:
            cfg.eval.retain_logs = retain_logs
        result = runner.run(cfg)
        rows.append({"run": entry, "output_dir": str(result.output_dir), **_row(result.eval or {})})
        _write(root, rows)  # keep partial results if a later run fails
    table, png = _write(root, rows)
    return SweepResult(root, rows, table, png)


# The TOFU numbers each sweep entry reports (sweep.md / sweep.json columns).
COLUMNS = (
    "forget_quality", "model_utility", "forget_truth_ratio", "forget_prob", "forget_rougeL", "retain_prob",
)  # fmt: skip


def _row(results: dict[str, Any]) -> dict[str, Any]:
    return {k: results.get(k) for k in COLUMNS}


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _write(root: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    cols = COLUMNS
    lines = [
        "| run | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        *("| " + r["run"] + " | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows),
    ]
    table = root / "sweep.md"
    atomic_write_text(table, "\n".join(lines) + "\n")
    write_json_atomic(rows, root / "sweep.json", indent=2)
    return table, plot(rows, root / "sweep.png")


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """TOFU's scatter: Model Utility (x) vs Forget Quality (y, log scale); the forget truth-ratio
    score stands in for Forget Quality when no retain logs were given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_fq = any(r.get("forget_quality") is not None for r in rows)
    ykey = "forget_quality" if have_fq else "forget_truth_ratio"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in rows:
        x, y = r.get("model_utility"), r.get(ykey)
        if x is None or y is None or not math.isfinite(x) or not math.isfinite(y):
            continue
        y = max(y, 1e-30) if have_fq else y
        marker = "*" if r["run"] == "original" else "o"
        ax.scatter([x], [y], marker=marker, s=80 if marker == "*" else 40)
        ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if have_fq:
        ax.set_yscale("log")
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS p-value)" if have_fq else "forget truth-ratio score (no retain logs)")
    ax.set_title("TOFU: forget quality vs model utility")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


__all__ = ["SweepResult", "plan", "plot", "sweep"]
