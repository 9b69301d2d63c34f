"""The small-scale TOFU study of SmolLM2-135M-Instruct (issue 16; docs/tofu_study.md), one command:

    python benchmarks/tofu_study.py                       # the study (hours on a 2-core CPU)
    python benchmarks/tofu_study.py --dry-run             # print the plan, run nothing
    python benchmarks/tofu_study.py --scale toy --base-model TINY_HF_DIR --out R --runs-dir D

1. data: forget01 (all rows), a fixed seeded subset of retain99, the target-finetune set (forget01 +
   subset) and the retain-finetune set (subset alone), written as JSONL (``data.benchmark=jsonl``);
2. stage 1: ``mode=finetune`` of the target and of the retain model from the base model, then the
   memorisation check of the target (forget ROUGE-L recall and answer probability, ``memorisation.json``);
3. stage 2: every method of the study from the target, same budget, per seed, each in its run
   directory, evaluated with the study's subsets (Forget Quality against the retain model's logs);
   ``per_epoch`` methods are also evaluated after every epoch;
4. ``results.md`` (the table), ``fq_vs_mu.png``, ``trajectories.png``, ``manifest.json`` and
   ``configs/`` (each run's resolved config) in the results folder.

Resumable: a run whose ``study_result.json`` exists is skipped (its line says so); the progress bar
counts runs. Only the public API is used: ``sga_jax.unlearn``, ``sga_jax.config.compose`` +
``sga_jax.runner.run`` (its ``evaluate`` hook, for per-epoch evaluation), ``sga_jax.eval.run.evaluate``
and ``sga_jax.eval.tofu.aggregate``. Models and eval logs go under the git-ignored ``runs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "benchmarks" / "tofu_study.yaml"
RESULT = "study_result.json"


# ------------------------------------------------------------------------------------------ plan


@dataclasses.dataclass
class Run:
    """One unit of work: a finetune, an unlearning run or the evaluation of a model."""

    name: str
    kind: str  # finetune | unlearn
    overrides: list[str]
    seed: int = 0
    per_epoch: bool = False
    method: str = ""

    def dir(self, runs_dir: Path) -> Path:
        return runs_dir / self.name


def load_study(path: str | os.PathLike, sets: Sequence[str] = (), scale: str = "full") -> dict[str, Any]:
    """The study section of ``path``; ``scale="toy"`` merges its ``toy`` block, then the ``--set``
    overrides apply (so they win over both)."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"tofu_study: error: study config not found: {p}")
    study = OmegaConf.to_container(OmegaConf.load(p), resolve=True).get("study")
    if not isinstance(study, dict):
        raise SystemExit(f"tofu_study: error: {p} has no 'study:' section")
    toy = study.pop("toy", {}) or {}
    if scale == "toy":
        for key in ("data", "finetune", "unlearn", "eval", "memorisation"):
            study[key] = {**study.get(key, {}), **toy.get(key, {})}
        study["toy_method_overrides"] = list(toy.get("method_overrides", []))
        study["max_seeds"] = toy.get("max_seeds")
    cfg = OmegaConf.merge(OmegaConf.create({"study": study}), OmegaConf.from_dotlist(list(sets)))
    return OmegaConf.to_container(cfg, resolve=True)["study"]


def plan(study: dict[str, Any]) -> list[Run]:
    """Stage 1 (two finetunes), then every method's first seed in the config's order, then the
    further seeds (so that a study stopped early has a row per method before it has repeats)."""
    runs = [
        # the retain model first: its eval logs give the target's Forget Quality
        Run("retain", "finetune", [], method="retain"),
        Run("target", "finetune", [], method="target"),
    ]
    names = set()
    unlearn: list[tuple[int, Run]] = []
    for m in study["methods"]:
        if m["name"] in names:
            raise SystemExit(f"tofu_study: error: method {m['name']!r} listed twice")
        names.add(m["name"])
        seeds = m.get("seeds", [0])[: study.get("max_seeds") or None]
        for rank, seed in enumerate(seeds):
            per_epoch = bool(m.get("per_epoch")) and rank == 0  # one trajectory per method
            run = Run(f"{m['name']}_seed{seed}", "unlearn", list(m["overrides"]), seed, per_epoch, m["name"])
            unlearn.append((rank, run))
    runs += [run for _, run in sorted(unlearn, key=lambda x: x[0])]  # stable: config order per rank
    return runs


def _train_overrides(section: dict[str, Any]) -> list[str]:
    return [f"train.{k}={v}" for k, v in section.items()]


# ------------------------------------------------------------------------------------------ data


def write_data(study: dict[str, Any], data_dir: Path, out: Path) -> dict[str, Any]:
    """The four JSONL files of the study; returns their row counts and the subset's row indices."""
    import numpy as np

    from sga_jax.data.jsonl import write_json_atomic
    from sga_jax.data.tofu import load_tofu

    d = study["data"]
    tofu_dir = data_dir / "tofu"
    forget = [
        {"question": r["question"], "answer": r["answer"]}
        for r in load_tofu(d["forget_split"], data_dir=tofu_dir)
    ]
    forget = forget[: d.get("forget_rows") or len(forget)]
    pool = load_tofu(d["retain_split"], data_dir=tofu_dir)
    n = min(int(d["retain_rows"]), len(pool))
    # The retain rows the evaluation scores (the first `eval.limit` of TOFU's retain split, which are
    # retain99's first rows) are always finetuned on, as in TOFU; a seeded draw of the rest fills up.
    first = min(int(study["eval"].get("limit") or 0), n)
    rest = np.random.default_rng(int(d["seed"])).choice(len(pool) - first, n - first, replace=False)
    idx = list(range(first)) + sorted((rest + first).tolist())
    subset = [{"question": pool[i]["question"], "answer": pool[i]["answer"]} for i in idx]
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "forget": forget,
        "retain_subset": subset,
        "target_finetune": forget + subset,
        "retain_finetune": subset,
    }
    for name, rows in files.items():
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / f"{name}.jsonl")
    info = {"rows": {k: len(v) for k, v in files.items()}, "retain_indices": idx, "seed": int(d["seed"])}
    write_json_atomic(info, out / "data_info.json", indent=1)
    return info


# ------------------------------------------------------------------------------------------ runs


def _runner():
    """``sga_jax.config.compose`` and the run function with the ``evaluate`` hook (public modules)."""
    from sga_jax import config, runner

    return config.compose, runner.run


def eval_options(study: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    return {**study["eval"], "data_dir": str(data_dir / "tofu"), "progress": False}


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "forget_quality",
        "model_utility",
        "forget_rougeL",
        "retain_rougeL",
        "forget_prob",
        "forget_truth_ratio",
    )
    return {k: res.get(k) for k in keys}


def base_model_mismatch(runs_dir: Path, base_model: str) -> str | None:
    """Why ``runs_dir`` cannot be resumed from ``base_model``, or None. Every run descends from the
    target, which was finetuned from the base model its ``config.yaml`` names: finished runs of
    another base model must not be reused as if they were this study's."""
    target = runs_dir / "target"
    if not (target / RESULT).is_file():
        return None
    from omegaconf import OmegaConf

    try:
        before = str(OmegaConf.load(target / "config.yaml").model.path)
    except Exception as e:  # an unreadable record is not a match
        return f"{target / 'config.yaml'} cannot be read ({e}), so its base model is unknown"
    same = before == base_model or (
        Path(before).exists() and Path(before).resolve() == Path(base_model).resolve()
    )
    if same:
        return None
    return (
        f"{runs_dir} holds runs finetuned from base model {before}, not {base_model}; "
        "use another --runs-dir (or remove that one) to study another base model"
    )


def execute(run: Run, study: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Train (or finetune) one run, evaluate it and write its ``study_result.json`` last."""
    import sga_jax
    from sga_jax.data.jsonl import write_json_atomic
    from sga_jax.eval.run import evaluate

    out = run.dir(ctx["runs_dir"])
    data = ctx["data_files"]
    common = [f"output_dir={out}", "train.progress=false", "train.resume=false", "eval.benchmark=none",
              f"data.data_dir={ctx['data_dir']}", "data.benchmark=jsonl"]  # fmt: skip
    opts = eval_options(study, ctx["data_dir"])
    if run.kind == "finetune":
        ft = "target_finetune" if run.name == "target" else "retain_finetune"
        overrides = ["mode=finetune", f"model.path={ctx['base_model']}", f"data.forget={data[ft]}",
                     *_train_overrides(study["finetune"]), *common]  # fmt: skip
        retain_logs = str(ctx["runs_dir"] / "retain" / "eval") if run.name == "target" else None
    else:
        overrides = [f"model.path={ctx['runs_dir'] / 'target' / 'model'}", f"data.forget={data['forget']}",
                     f"data.retain={data['retain_subset']}", *run.overrides,
                     *_train_overrides(study["unlearn"]), f"train.seed={run.seed}", *common]  # fmt: skip
        if run.method == "kfade" or "method=kfade" in run.overrides:
            overrides += study.get("toy_method_overrides", [])
        retain_logs = str(ctx["runs_dir"] / "retain" / "eval")
    fq = {"retain_logs": retain_logs} if retain_logs else {}
    t0 = time.perf_counter()
    epochs: list[dict[str, Any]] = []
    if run.per_epoch:
        compose, run_fn = _runner()
        cfg = compose([], overrides)
        n_rows = len(Path(data["forget"]).read_text().splitlines())
        t = cfg.train
        steps = t.steps or max(1, math.ceil(t.epochs * n_rows / t.batch_size))
        # one epoch; with train.steps (toy scale) every step
        every = 1 if t.steps else max(1, math.ceil(n_rows / t.batch_size))
        tok = sga_jax.load_tokenizer(ctx["runs_dir"] / "target" / "model")
        seen: dict[str, Any] = {"i": 0, "eval_s": 0.0, "final": None}

        def per_epoch(model):  # called at step 0 and after every `every` steps (train.resume=false)
            step = min(seen["i"] * every, steps)
            seen["i"] += 1
            point = {"step": step, "epoch": step * t.batch_size / n_rows}
            if step == 0:  # the unchanged target: its evaluation is already on disk
                start = json.loads((ctx["runs_dir"] / "target" / RESULT).read_text())
                epochs.append({**point, **_summary(start)})
                return {k: v for k, v in _summary(start).items() if v is not None}
            te = time.perf_counter()
            # the last step's model is the run's final model: its evaluation is the run's evaluation
            where = out / "eval" if step == steps else out / "epochs" / f"step{step}"
            res = evaluate("tofu", out / "model", where, model=model, tokenizer=tok, **fq, **opts)
            seen["eval_s"] += time.perf_counter() - te
            if step == steps:
                seen["final"] = (res, time.perf_counter() - te)
            epochs.append({**point, **_summary(res)})
            return {k: v for k, v in _summary(res).items() if v is not None}

        run_fn(cfg, evaluate=per_epoch, eval_every=every)
        train_s = time.perf_counter() - t0 - seen["eval_s"]
    else:
        sga_jax.unlearn(None, *overrides)
        train_s = time.perf_counter() - t0
    if run.per_epoch and seen["final"] is not None:
        res, eval_s = seen["final"]
    else:
        t1 = time.perf_counter()
        res = evaluate("tofu", out / "model", out / "eval", **fq, **opts)
        eval_s = time.perf_counter() - t1
    result = {"name": run.name, "method": run.method, "seed": run.seed, "train_seconds": train_s,
              "eval_seconds": eval_s, **_summary(res), "results": res, "epochs": epochs}  # fmt: skip
    write_json_atomic(result, out / RESULT, indent=1)
    return result


def memorisation_check(study: dict[str, Any], target: dict[str, Any], path: Path) -> list[str]:
    """The target's forget ROUGE-L recall and answer probability against the study's thresholds."""
    from sga_jax.data.jsonl import write_json_atomic

    th = study["memorisation"]
    got = {"forget_rougeL": target["forget_rougeL"], "forget_prob": target["forget_prob"]}
    warnings = [
        f"the target has not memorised {study['data']['forget_split']}: {k} = {got[k]:.3f} < {th['min_' + k]}"
        for k in got
        if got[k] < th["min_" + k]
    ]
    write_json_atomic(
        {**got, "thresholds": th, "memorised": not warnings, "warnings": warnings}, path, indent=1
    )
    return warnings


# ------------------------------------------------------------------------------------------ report


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}"
    return str(v)


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    head = ["method", "seed", "FQ", "MU", "forget ROUGE-L", "retain ROUGE-L", "forget truth ratio",
            "train s", "eval s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], r["seed"], r["forget_quality"], r["model_utility"], r["forget_rougeL"],
                 r["retain_rougeL"], r["forget_truth_ratio"], f"{r['train_seconds']:.0f}",
                 f"{r['eval_seconds']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def plot_scatter(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    level: dict[float, int] = {}  # FQ takes few values (KS statistic k/40): stagger labels on one level
    for r in sorted(rows, key=lambda r: r["model_utility"]):
        if r["forget_quality"] is None:  # the retain model is the reference of FQ: its MU as a line
            ax.axvline(r["model_utility"], color="grey", linestyle=":", label=f"{r['method']} model MU")
            continue
        fq = max(r["forget_quality"], 1e-30)
        ax.scatter(r["model_utility"], fq, marker="*" if r["method"] in ("target", "retain") else "o")
        i = level[round(fq, 6)] = level.get(round(fq, 6), -1) + 1
        ax.annotate(f"{r['method']}/{r['seed']}", (r["model_utility"], fq), fontsize=7,
                    xytext=(3, 4 if i % 2 == 0 else -10), textcoords="offset points")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS p-value vs retain model)")
    ax.set_title("TOFU forget01, SmolLM2-135M")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_trajectories(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        if not r.get("epochs"):
            continue
        ep = [e["epoch"] for e in r["epochs"]]
        a.plot(ep, [max(e["forget_quality"] or 1e-30, 1e-30) for e in r["epochs"]], "o-", label=r["name"])
        b.plot(ep, [e["model_utility"] for e in r["epochs"]], "o-", label=r["name"])
    a.set_yscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("Forget Quality")
    b.set_xlabel("epoch")
    b.set_ylabel("Model Utility")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_manifest(study, args, runs, rows, data_info, results_dir: Path) -> None:
    import importlib.metadata as md

    from sga_jax.data.jsonl import write_json_atomic

    versions = {"python": platform.python_version()}
    for pkg in ("sga_jax", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "transformers", "rouge-score"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cfg_dir = results_dir / "configs"
    cfg_dir.mkdir(exist_ok=True)
    for run in runs:
        src = run.dir(Path(args.runs_dir)) / "config.yaml"
        if src.is_file():
            (cfg_dir / f"{run.name}.yaml").write_text(src.read_text())
    manifest = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "scale": args.scale,
        "study": study,
        "versions": versions,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seeds": {
            "data": data_info["seed"],
            "eval_subset": study["eval"].get("subset_seed"),
            "runs": {r.name: r.seed for r in runs},
        },  # fmt: skip
        "data": data_info,
        "runs": [{k: v for k, v in r.items() if k != "results"} for r in rows],
    }
    write_json_atomic(manifest, results_dir / "manifest.json", indent=1)


# ------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--scale", choices=("full", "toy"), default="full")
    ap.add_argument("--base-model", default=None, help="overrides study.base_model")
    ap.add_argument("--out", default=None, help="results folder (default study.results_dir)")
    ap.add_argument("--runs-dir", default=None, help="run folders (default study.runs_dir, git-ignored)")
    ap.add_argument(
        "--data-dir", default=None, help="benchmark data root ($SGA_JAX_DATA_DIR / ../shared/data)"
    )
    ap.add_argument("--only", default=None, help="comma-separated run names (e.g. target,retain,ga_seed0)")
    ap.add_argument("--set", action="append", default=[], help="study.key=value override (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)

    study = load_study(args.config, args.set, args.scale)
    args.out = args.out or str(ROOT / study["results_dir"])
    args.runs_dir = args.runs_dir or str(ROOT / study["runs_dir"])
    base_model = args.base_model or study["base_model"]
    runs = plan(study)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r.name for r in runs}
        if unknown:
            print(f"tofu_study: error: --only names unknown runs: {sorted(unknown)}", file=sys.stderr)
            return 2
    runs_dir, results_dir = Path(args.runs_dir), Path(args.out)
    mismatch = base_model_mismatch(runs_dir, str(base_model))
    if mismatch:
        print(f"tofu_study: error: {mismatch}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"study: {args.config} (scale {args.scale}); base model {base_model}")
        print(f"runs: {runs_dir}; results: {results_dir}; eval: {study['eval']}")
        print(f"finetune: {study['finetune']}; unlearn: {study['unlearn']}")
        for r in runs:
            state = "done" if (r.dir(runs_dir) / RESULT).is_file() else "todo"
            extra = " per-epoch eval" if r.per_epoch else ""
            print(f"  [{state}] {r.name:<22} {r.kind:<8} seed {r.seed} {' '.join(r.overrides)}{extra}")
        return 0

    from tqdm.auto import tqdm

    from sga_jax.paths import data_root

    data_dir = Path(args.data_dir) if args.data_dir else data_root()
    data_info = write_data(study, data_dir, runs_dir / "data")
    ctx = {
        "runs_dir": runs_dir,
        "data_dir": data_dir,
        "base_model": base_model,
        "data_files": {k: str(runs_dir / "data" / f"{k}.jsonl") for k in data_info["rows"]},
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(runs, desc="tofu study", unit="run")
    for run in bar:
        bar.set_postfix_str(run.name)
        done = run.dir(runs_dir) / RESULT
        if done.is_file():
            bar.write(f"tofu_study: skip {run.name} (finished: {done})", file=sys.stderr)
            rows.append(json.loads(done.read_text()))
        elif args.only and run.name not in wanted:
            continue
        else:
            rows.append(execute(run, study, ctx))
        # the report after every run: an interrupted study still leaves its finished rows
        write_report(study, args, runs, rows, data_info, results_dir)
        if run.name == "target":
            warnings = memorisation_check(study, rows[-1], results_dir / "memorisation.json")
            for w in warnings:
                bar.write(f"tofu_study: WARNING: {w}", file=sys.stderr)
            if warnings and study["memorisation"].get("stop", True):
                print("tofu_study: error: stopped before unlearning: raise study.finetune.lr or .epochs "
                      "(or --set study.memorisation.stop=false)", file=sys.stderr)  # fmt: skip
                return 1
    print(f"tofu_study: {len(rows)} runs; table {results_dir / 'results.md'}")
    return 0


def write_report(study, args, runs, rows, data_info, results_dir: Path) -> None:
    write_table(rows, results_dir / "results.md")
    plot_scatter(rows, results_dir / "fq_vs_mu.png")
    plot_trajectories(rows, results_dir / "trajectories.png")
    write_manifest(study, args, runs, rows, data_info, results_dir)


if __name__ == "__main__":
    sys.exit(main())
