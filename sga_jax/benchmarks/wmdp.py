"""WMDP (Li et al., 2024): RMU's unlearning corpora, and multiple-choice accuracy.

Training rows (RMU's setup, centerforaisafety/wmdp ``rmu/utils.py`` ``get_data``): ``data.forget`` a
forget corpus (``cyber-forget-corpus``; ``bio-forget-corpus`` is gated), ``data.retain`` Wikitext-2
(``wikitext``, the default) or a retain corpus, from the hub (``data.source=hub``) or as
``<name>.jsonl`` files in ``data.data_dir`` (:func:`sga_jax.data.wmdp.load_corpus`). Evaluation:
accuracy on a WMDP-format file (``data=``) or a ``cais/wmdp`` hub config (``source=hub``), scored as
lm-evaluation-harness scores it (:func:`sga_jax.eval.wmdp.wmdp_accuracy`).
"""

from __future__ import annotations

from typing import Any

from sga_jax.benchmarks.registry import Benchmark, EvalRun, register
from sga_jax.errors import DataError
from sga_jax.eval.options import text, whole


def _rows(d: Any, where: dict[str, Any], need_retain: bool) -> tuple[list[dict], list[dict] | None]:
    from sga_jax.data.wmdp import load_corpus

    kw = {"source": where.get("source", "local"), "data_dir": where.get("data_dir"), "limit": where["limit"]}
    forget = load_corpus(d.forget, **kw)
    return forget, (load_corpus(d.retain or "wikitext", **kw) if need_retain else None)


def _run(r: EvalRun) -> dict[str, Any]:
    from sga_jax.data.wmdp import load_wmdp
    from sga_jax.eval.wmdp import wmdp_accuracy

    spec = r.options.pop("data", None)
    if spec is None:
        raise DataError("wmdp needs data=<file> (or a cais/wmdp config with source='hub')")
    rows = load_wmdp(spec, source=r.source, limit=r.limit)
    return wmdp_accuracy(r.model, r.tokenizer, rows, **r.options)


WMDP = register(
    Benchmark(
        name="wmdp",
        run=_run,
        options={"data": text, "batch_size": whole},
        result_keys=("accuracy",),
        load_rows=_rows,
        data_folder="wmdp",
        help="  wmdp:            data=FILE (or a cais/wmdp config with source=hub)  batch_size=N",
    )
)
