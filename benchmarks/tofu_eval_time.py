"""Wall time of a full TOFU evaluation of SmolLM2-135M-Instruct on this CPU.

Full = TOFU's eval_everything: forget10 (first 300) + retain_perturbed (first 300) + real authors
(100) + world facts (117), losses of every answer / paraphrase / perturbation and greedy generation
(max_length 200). ``--limit N`` runs the first N rows of each split and extrapolates the row-linear
part (time after the first, compile-including, split) to the full 817 rows; the result file says
which. Run it niced: ``nice -n 10 python benchmarks/tofu_eval_time.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

FULL_ROWS = {"eval_log": 300, "eval_real_author_wo_options": 100, "eval_real_world_wo_options": 117,
             "eval_log_forget": 300}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="rows per split (default: all, as TOFU)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tofu_eval_time.json"))
    args = ap.parse_args()

    import jax

    import sga_jax
    from sga_jax.data.formatting import PromptFormatter
    from sga_jax.eval import tofu

    gguf = sga_jax.paths.smollm2_gguf()
    t0 = time.perf_counter()
    model = sga_jax.load_model(gguf, dtype="float32", scan_layers=False)  # as eval.run does
    tok = sga_jax.load_tokenizer(gguf)
    load_s = time.perf_counter() - t0
    fmt = PromptFormatter(tok, "auto", max_length=512)
    per_task = {}
    with tempfile.TemporaryDirectory() as d:
        for task in FULL_ROWS:
            t = time.perf_counter()
            tofu.evaluate(model, tok, d, tasks=[task], limit=args.limit or 300, formatter=fmt,
                          batch_size=args.batch_size)  # fmt: skip
            rows = min(args.limit or FULL_ROWS[task], FULL_ROWS[task])
            per_task[task] = {"rows": rows, "seconds": time.perf_counter() - t}
        agg = tofu.aggregate(d)
    measured = sum(v["seconds"] for v in per_task.values())
    if args.limit:
        # Per-row cost from the splits after the first (whose time includes most compilation).
        later = list(per_task.values())[1:]
        per_row = sum(v["seconds"] for v in later) / sum(v["rows"] for v in later)
        first = list(per_task.values())[0]
        estimate = first["seconds"] + per_row * (sum(FULL_ROWS.values()) - first["rows"])
    else:
        estimate = measured
    import datetime
    import os

    import flax

    result = {
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__},
        "load_average_at_end": os.getloadavg(),
        "what": "TOFU eval (forget10 + retain_perturbed + real authors + world facts, with generation) "
        "of SmolLM2-135M-Instruct (float32, chat template, unrolled layers), sga_jax on CPU",
        "mode": "full" if not args.limit else f"subset: first {args.limit} rows per split, extrapolated",
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}, "
        f"{platform.processor() or platform.machine()}",
        "model_load_seconds": load_s,
        "per_task": per_task,
        "measured_seconds": measured,
        "estimated_full_seconds": estimate,
        "under_30_minutes": estimate < 1800,
        "model_utility_on_measured_rows": agg["model_utility"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
