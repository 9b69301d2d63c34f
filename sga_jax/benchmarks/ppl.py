"""Perplexity of a text set (``data=``: a file, ``tofu:<config>``, ``muse:raw[/split]``; see
:func:`sga_jax.data.texts.load_texts`)."""

from __future__ import annotations

from typing import Any

from sga_jax.benchmarks.registry import Benchmark, EvalRun, register
from sga_jax.eval.options import text, whole


def _run(r: EvalRun) -> dict[str, Any]:
    from sga_jax.data.texts import load_texts
    from sga_jax.eval.mia import perplexity

    spec = r.options.pop("data", "muse:raw/forget")
    texts = load_texts(spec, r.limit, r.data_dir)
    return {"data": spec, "perplexity": perplexity(r.model, r.tokenizer, texts, **r.options)}


PPL = register(
    Benchmark(
        name="ppl",
        run=_run,
        options={"data": text, "max_length": whole, "batch_size": whole},
        result_keys=("data", "perplexity"),
        help="  ppl:             data=FILE|tofu:<config>|muse:raw[/split]  max_length=N  batch_size=N",
    )
)
