"""K-FADE's claim on the TOFU study's target (issue 23): at its shipped defaults it suppresses the
forget answers while the retain outputs barely move, against GradDiff and NPO at a matched
forget-NLL rise.

    python benchmarks/kfade_claim.py            # after `python benchmarks/tofu_study.py --only target,retain`

Reads the study's target and retain models and data (``study.runs_dir``, or ``--runs-dir``) and the
study's unlearning recipe and evaluation (benchmarks/tofu_study.yaml), then:

1. K-FADE at ``configs/method/kfade.yaml``'s defaults (``sga_jax.runner.run``), its forget-NLL rise
   Δ = mean token NLL of the 40 forget01 rows after − before;
2. GradDiff and NPO with the study's recipe; after every step the same forget NLL is measured, and
   once a step crosses Δ the parameters between it and the step before are bisected
   (θ = θ_{s−1} + α(θ_s − θ_{s−1})) to the same rise. A method that never reaches Δ is reported
   at its last step, marked "not reached";
3. for the target and each run: TOFU Forget Quality (against the retain model's logs) and Model
   Utility with the study's evaluation, and the mean per-token KL (teacher-forced, every answer
   token equal) of the retain model ‖ run on forget and on retain answers ("distance to
   retraining in output space") and of the target ‖ run on retain answers (how far the retain
   outputs moved).

Writes ``results.md`` and ``results.json`` to ``--out`` (default benchmarks/results/kfade_claim/)
with the date, machine, versions and load. Scratch models go under ``--work`` (git-ignored runs/).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import tofu_study as S  # noqa: E402


class _Reached(Exception):
    """Raised from the evaluation hook once a step crosses the target rise (ends the run early)."""


def _overrides(study: dict, runs_dir: Path, data_dir: Path, out: Path, method: str) -> list[str]:
    files = runs_dir / "data"
    return [
        f"model.path={runs_dir / 'target' / 'model'}", f"data.forget={files / 'forget.jsonl'}",
        f"data.retain={files / 'retain_subset.jsonl'}", f"method={method}",
        *S._train_overrides(study["unlearn"]), "train.seed=0", f"output_dir={out}", "train.progress=false",
        "train.resume=false", "eval.benchmark=none", f"data.data_dir={data_dir}", "data.benchmark=jsonl",
    ]  # fmt: skip


def forget_nll(model: Any, forget: dict) -> float:
    import numpy as np

    from sga_jax.logprobs import batched_nll

    return float(np.mean(batched_nll(model, forget)))


def run_kfade(study, runs_dir, data_dir, work) -> dict[str, Any]:
    from sga_jax import config, runner

    cfg = config.compose([], _overrides(study, runs_dir, data_dir, work / "kfade", "kfade"))
    t0 = time.perf_counter()
    res = runner.run(cfg)
    hist = res.history
    return {"name": "kfade", "model_dir": str(res.model_dir), "seconds": time.perf_counter() - t0,
            "forget_nll_before": hist[0]["forget_nll"], "forget_nll_after": hist[-1]["forget_nll"],
            "steps": hist[1:], "config": dataclasses.asdict(cfg.method)}  # fmt: skip


def run_matched(study, runs_dir, data_dir, work, method: str, before: float, rise: float) -> dict[str, Any]:
    """``method`` with the study's recipe, stopped and bisected at ``before + rise`` forget NLL."""
    import jax
    import numpy as np
    from flax import nnx

    from sga_jax import config, runner
    from sga_jax.models.hf import save_model

    cfg = config.compose([], _overrides(study, runs_dir, data_dir, work / method, method))
    prepared = runner.prepare(cfg)
    forget, goal = prepared.data.forget, before + rise
    seen: dict[str, Any] = {"prev": None, "trace": []}

    def hook(model):
        nll = forget_nll(model, forget)
        seen["trace"].append(nll)
        params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        if nll >= goal and seen["prev"] is not None:
            seen["cross"] = (seen["prev"], params, model)
            raise _Reached
        seen["prev"], seen["last"] = params, model
        return {"forget_nll_all": nll}

    t0 = time.perf_counter()
    try:
        runner.run(cfg, prepared=prepared, evaluate=hook, eval_every=1)
        reached, model = False, seen["last"]
    except _Reached:
        reached = True
        lo_p, hi_p, model = seen["cross"]
        lo, hi = 0.0, 1.0
        for _ in range(12):  # bisection of the forget NLL along the last step
            mid = 0.5 * (lo + hi)
            nnx.update(model, jax.tree.map(lambda a, b, m=mid: a + m * (b - a), lo_p, hi_p))
            lo, hi = (mid, hi) if forget_nll(model, forget) < goal else (lo, mid)
        nnx.update(model, jax.tree.map(lambda a, b: a + hi * (b - a), lo_p, hi_p))
    model_dir = save_model(model, work / f"{method}_matched" / "model", tokenizer=prepared.tokenizer,
                           overwrite=True)  # fmt: skip
    return {"name": method, "model_dir": str(model_dir), "seconds": time.perf_counter() - t0,
            "reached": reached, "forget_nll_before": before, "forget_nll_after": forget_nll(model, forget),
            "per_step_forget_nll": seen["trace"]}  # fmt: skip


def measure(row: dict, study, runs_dir, data_dir, work, batches, models) -> None:
    """TOFU FQ / MU with the study's evaluation, and the output-space KLs, into ``row``."""
    import sga_jax
    from sga_jax.eval.run import evaluate
    from sga_jax.output_space import token_kl

    model = sga_jax.load_model(row["model_dir"])
    row["kl_retain_model_forget"] = token_kl(models["retain"], model, batches["forget"])
    row["kl_retain_model_retain"] = token_kl(models["retain"], model, batches["retain"])
    row["kl_target_retain"] = token_kl(models["target"], model, batches["retain"])
    if row["name"] == "target":
        res = json.loads((runs_dir / "target" / S.RESULT).read_text())["results"]
    else:
        t0 = time.perf_counter()
        logs = str(runs_dir / "retain" / "eval")
        opts = S.eval_options(study, data_dir)
        res = evaluate("tofu", row["model_dir"], work / row["name"] / "eval", retain_logs=logs, **opts)
        row["eval_seconds"] = time.perf_counter() - t0
    row.update({k: res.get(k) for k in ("forget_quality", "model_utility", "forget_rougeL", "retain_rougeL")})


def _batches(data) -> dict[str, list[dict]]:
    """The 40 forget rows and the 40 evaluated retain rows (the retain subset's first 40), in
    batches of 8 (the answers as the runs were trained on them)."""
    keys = ("input_ids", "attention_mask", "loss_mask")
    cut = lambda b, n: [{k: b[k][i : i + 8] for k in keys} for i in range(0, n, 8)]  # noqa: E731
    return {"forget": cut(data.forget, 40), "retain": cut(data.retain, 40)}


def write(rows: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    head = ("| run | forget NLL | Δ forget NLL | FQ | MU | forget ROUGE-L | KL(retain model ‖ run), forget "
            "| KL(retain model ‖ run), retain | KL(target ‖ run), retain |")  # fmt: skip
    lines = [
        "# K-FADE at its defaults vs GradDiff / NPO at a matched forget-NLL rise (TOFU forget01, "
        "SmolLM2-135M)",
        "",
        f"Written by benchmarks/kfade_claim.py on {meta['date']} ({meta['machine']}, load "
        f"{meta['load_before']} → {meta['load_after']}; jax {meta['jax']}, flax {meta['flax']}). Target "
        "and retain model: the TOFU "
        "study's (benchmarks/tofu_study.yaml); evaluation: the study's (40 rows per split). KL: mean per "
        "answer token, teacher-forced on the 40 forget01 rows and the 40 evaluated retain rows.",
        "",
        head,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = r["name"] + ("" if r.get("reached", True) else " (rise not reached)")
        d = r["forget_nll_after"] - r["forget_nll_before"]
        lines.append(
            f"| {name} | {r['forget_nll_after']:.3f} | {d:+.3f} | {r['forget_quality']:.3g} | "
            f"{r['model_utility']:.3f} | {r['forget_rougeL']:.3f} | {r['kl_retain_model_forget']:.3f} | "
            f"{r['kl_retain_model_retain']:.3f} | {r['kl_target_retain']:.4f} |"
        )
    if rows and rows[1:2] and rows[1].get("steps"):
        lines += [
            "",
            "K-FADE's steps (metrics.jsonl): η, predicted KL ½η²dᵀGd, measured retain KL, guard shrink:",
            "",
        ]
        lines += [f"- step {s['step']}: η {s['eta']:.3g}, predicted {s['predicted_kl']:.4f}, measured "
                  f"{s.get('retain_kl', float('nan')):.4f}, shrink {s.get('shrink', 1.0):.3g}"
                  for s in rows[1]["steps"]]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", default=None, help="the study's runs (default study.runs_dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kfade_claim"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "kfade_claim"))
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    import flax
    import jax

    import sga_jax
    from sga_jax import config, runner
    from sga_jax.paths import data_root

    study = S.load_study(S.DEFAULT_CONFIG)
    runs_dir = Path(args.runs_dir or ROOT / study["runs_dir"])
    data_dir = Path(args.data_dir) if args.data_dir else data_root()
    work = Path(args.work)
    for need in (runs_dir / "target" / S.RESULT, runs_dir / "retain" / "eval"):
        if not need.exists():
            print(f"kfade_claim: error: {need} is missing: run `python benchmarks/tofu_study.py --only "
                  "target,retain` first", file=sys.stderr)  # fmt: skip
            return 2
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_before": round(os.getloadavg()[0], 2), "jax": jax.__version__,
            "flax": flax.__version__}  # fmt: skip
    data = runner.prepare(
        config.compose([], _overrides(study, runs_dir, data_dir, work / "probe", "graddiff"))
    ).data
    batches = _batches(data)
    models = {"retain": sga_jax.load_model(runs_dir / "retain" / "model"),
              "target": sga_jax.load_model(runs_dir / "target" / "model")}  # fmt: skip
    before = forget_nll(models["target"], data.forget)
    target = {"name": "target", "model_dir": str(runs_dir / "target" / "model"),
              "forget_nll_before": before, "forget_nll_after": before}  # fmt: skip
    kfade = run_kfade(study, runs_dir, data_dir, work)
    rise = kfade["forget_nll_after"] - kfade["forget_nll_before"]
    rows = [target, kfade]
    rows += [run_matched(study, runs_dir, data_dir, work, m, before, rise) for m in ("graddiff", "npo")]
    for r in rows:
        measure(r, study, runs_dir, data_dir, work, batches, models)
        print(
            f"kfade_claim: {r['name']}: FQ {r['forget_quality']:.3g}, MU {r['model_utility']:.3f}",
            file=sys.stderr,
        )
    meta["load_after"] = round(os.getloadavg()[0], 2)
    write(rows, Path(args.out), meta)
    print(f"kfade_claim: table {Path(args.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
