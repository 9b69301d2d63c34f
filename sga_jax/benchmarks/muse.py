"""MUSE (Shi et al., 2024): MUSE-News (BBC news) and MUSE-Books (Harry Potter), one entry each.

Training rows: ``data.forget`` ``raw`` (the forget corpus; MUSE-Books' is cut into
``data.max_length``-token chunks as MUSE trains, :func:`sga_jax.data.muse.chunk_text`) or ``knowmem``;
``data.retain`` ``retain2`` (default) or ``knowmem_retain``. Evaluation: VerbMem, KnowMem on forget
and retain, PrivLeak against a retrain AUC (:func:`sga_jax.eval.muse.evaluate`), and open-unlearning's
extraction strength / exact memorization.
"""

from __future__ import annotations

from typing import Any

from sga_jax.benchmarks.registry import Benchmark, EvalRun, register
from sga_jax.errors import ConfigError
from sga_jax.eval.options import auc_or_null, flag, list_of, text, whole

METRICS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak", "extraction_strength", "exact_memorization")
OPTIONS = {
    "metrics": list_of(*METRICS),
    "retrain_auc": auc_or_null,
    "batch_size": whole,
    "progress": flag,
    "hub_repo": text,
}
# The training splits and the loaders that read them.
SPLITS = {
    "raw": ("load_raw", "forget"),
    "knowmem": ("load_knowmem", "forget"),
    "retain2": ("load_privleak", "retain2"),
    "knowmem_retain": ("load_knowmem", "retain"),
}


def _rows_of(corpus: str, hub: str):
    def rows(d: Any, where: dict[str, Any], need_retain: bool) -> tuple[list[dict], list[dict] | None]:
        from sga_jax.data import muse

        kw = {**where, "corpus": corpus}
        # Books' raw forget text is one row here: _chunk cuts it (and applies data.limit)
        raw_kw = {**kw, "limit": None} if corpus == "books" else kw
        retain = d.retain or "retain2"
        for key, value in (("data.forget", d.forget), ("data.retain", retain)):
            if value not in SPLITS:
                raise ConfigError(f"{key}: unknown {hub} split {value!r}; choose one of {', '.join(SPLITS)}")

        def load(name: str) -> list[dict]:
            fn, split = SPLITS[name]
            return getattr(muse, fn)(split, **(raw_kw if name == "raw" else kw))

        return load(d.forget), (load(retain) if need_retain else None)

    return rows


def _chunk(d: Any, rows: list[dict], tokenizer: Any) -> list[dict]:
    """MUSE-Books' raw forget rows as MUSE trains on them: the text (its rows joined by a blank line)
    cut into ``data.max_length``-token chunks, the first ``data.limit`` of them."""
    from sga_jax.data import muse

    if d.forget != "raw":
        return rows
    return muse.chunk_text("\n\n".join(r["text"] for r in rows), tokenizer, d.max_length)[: d.limit]


def _run_of(corpus: str):
    def run(r: EvalRun) -> dict[str, Any]:
        from sga_jax.data.jsonl import write_json_atomic
        from sga_jax.eval import muse

        where = {"limit": r.limit, "source": r.source, "data_dir": r.data_dir, "corpus": corpus}
        res = muse.evaluate(r.model, r.tokenizer, **where, **r.options)
        write_json_atomic(res.pop("logs"), r.out / "muse_logs.json", indent=2)
        return res

    return run


def _muse(corpus: str, hub: str, help: str, **extra: Any) -> Benchmark:
    """One MUSE corpus' entry: the same options, loaders and logs, its own folder (``muse_<corpus>``)."""
    return register(
        Benchmark(
            name=f"muse_{corpus}",
            run=_run_of(corpus),
            options=OPTIONS,
            load_rows=_rows_of(corpus, hub),
            data_folder=f"muse_{corpus}",
            writes=("muse_logs.json",),
            help=help,
            **extra,
        )  # fmt: skip
    )


MUSE_NEWS = _muse(
    "news", "MUSE-News",
    "  muse_news:       metrics=[verbmem_f,knowmem_f,knowmem_r,privleak]  retrain_auc=X|official"
    "  batch_size=8",
)  # fmt: skip
MUSE_BOOKS = _muse(
    "books", "MUSE-Books", "  muse_books:      as muse_news (MUSE-Books, Harry Potter)", prepare_forget=_chunk
)
