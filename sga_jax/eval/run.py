"""``evaluate(benchmark, model_path, out_dir, **options)``: load a model, run a benchmark, write JSON.

The benchmarks and their options are the registry's (:mod:`sga_jax.benchmarks`): each entry's runner
gets the loaded model and an :class:`~sga_jax.benchmarks.registry.EvalRun`, and this function
records the options given, checks the results are finite and writes them atomically.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from sga_jax.benchmarks.registry import EvalRun, get
from sga_jax.data.jsonl import write_json_atomic
from sga_jax.errors import ConfigError, DataError
from sga_jax.eval.options import check_options
from sga_jax.fsutil import write_marker
from sga_jax.models.hf import load_model, load_tokenizer


def check_retain_logs_outside(
    out: str | os.PathLike, retain_logs: Any, what: str = "retain_logs", where: str = "the output folder"
) -> None:
    """A ConfigError when the retain logs are, or lie inside, the evaluation's output folder: the
    evaluation would overwrite them with the evaluated model's own logs (and report Forget Quality
    1.0, the model against itself)."""
    if retain_logs is None:
        return
    logs, folder = Path(retain_logs).expanduser().resolve(), Path(out).expanduser().resolve()
    if logs == folder or folder in logs.parents:
        raise ConfigError(
            f"{what} {retain_logs} is inside {where} {out}: the evaluation would overwrite "
            "the retain model's logs; choose another output folder"
        )


def _check_finite(results: dict[str, Any], benchmark: str, model_path: Any) -> None:
    """A NaN / inf score is a broken model, not a result (and not valid JSON): refused, naming it."""
    for key, value in results.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(
                f"the {benchmark} evaluation of {model_path} gave {key}={value}: the model's outputs "
                "are not finite (NaN or inf weights?); no results written"
            )


def evaluate(
    benchmark: str,
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    model: Any = None,
    tokenizer: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``benchmark`` on the model at ``model_path`` (or a given ``model`` / ``tokenizer``) and
    write ``out_dir/results.json`` (+ the official TOFU logs). Returns the results dict."""
    bench = get(benchmark, kind="eval")
    check_options(benchmark, options)
    check_retain_logs_outside(out_dir, options.get("retain_logs"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model is None and bench.loads_model:
        # Unrolled layers: greedy decoding with a per-layer cache updates it in place, while the
        # stacked [L, ...] cache of scan_layers is rewritten every token (measured on the 2-core CPU,
        # SmolLM2-135M, batch 16: ~45 vs ~125 ms per new token). Compile time is a few seconds more.
        model = load_model(model_path, dtype=dtype, scan_layers=False)
    if tokenizer is None and bench.loads_model:
        tokenizer = load_tokenizer(tokenizer_path or model_path)
    # Every option given is recorded, so that e.g. a 10-row result cannot pass for an official one.
    plain = str | int | float | bool | list | None
    given = {k: v if isinstance(v, plain) else str(v) for k, v in options.items()}
    data_dir = options.pop("data_dir", None)
    source = options.pop("source", "local")
    limit = options.pop("limit", None)
    limit = bench.default_limit if limit is None else limit
    results: dict[str, Any] = {
        "benchmark": benchmark,
        "model": str(model_path),
        "limit": limit,  # rows per split; null: all
        "options": given,
    }
    results.update(
        bench.run(EvalRun(model, tokenizer, out, limit, source, data_dir, options, str(model_path)))
    )
    missing = [k for k in bench.result_keys if k not in results]
    if missing:  # a registration that promises keys its runner does not give: a bug, said plainly
        raise RuntimeError(f"the {benchmark} evaluation returned no {', '.join(missing)}")
    results["seconds"] = time.perf_counter() - t0
    _check_finite(results, benchmark, model_path)
    write_json_atomic(results, out / "results.json", indent=2, allow_nan=False)
    write_marker(out, ("results.json", *bench.writes))  # the files a later eval may replace
    return results
