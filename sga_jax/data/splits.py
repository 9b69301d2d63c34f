"""Which rows a run reads: the data-file rules of ``data.*`` and the method-side row files.

``load_rows(data_config, need_retain=...)`` gives the forget (or finetuning) rows and, when the
method needs them, the retain rows (TOFU's retain default: :data:`sga_jax.data.tofu.RETAIN_FOR_FORGET`);
``encode`` turns rows into one fixed-shape batch; ``flat_templates`` / ``template_rows`` give FLAT's
template answers; ``load_normal_file`` reads SGA's normal samples from a file. Nothing here runs a
model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sga_jax import config as C
from sga_jax.benchmarks.registry import get
from sga_jax.data import jsonl, tofu
from sga_jax.data.batching import bucket_length, collate
from sga_jax.errors import DataError
from sga_jax.paths import benchmark_dir

Batch = dict[str, np.ndarray]

BUILTIN_IDK = "I'm not sure about that; I don't know the answer."


def data_file(path: str, key: str) -> Path:
    """``path`` as an existing file, or one error naming the config ``key``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{key}: data file not found: {p}")
    return p


def load_rows(d: C.DataConfig, *, need_retain: bool) -> tuple[list[dict], list[dict] | None]:
    """The forget (or finetuning) rows and, when needed, the retain rows of ``d``, read by its
    benchmark's loader (:mod:`sga_jax.benchmarks`)."""
    bench = get(d.benchmark, kind="data", key="data.benchmark")
    folder = bench.data_folder  # the benchmark's folder under the data root (None: the user's files)
    where: dict[str, Any] = {"data_dir": benchmark_dir(d.data_dir, folder) if folder else d.data_dir}
    if folder and d.source == "hub":
        where = {"source": "hub", "hub_repo": d.hub_repo}
    forget, retain = bench.load_rows(d, {**where, "limit": d.limit}, need_retain)
    if not forget:
        raise DataError(f"data.forget: {d.forget!r} has no rows")
    if need_retain and not retain:
        raise DataError(f"data.retain: {d.retain!r} has no rows")
    return forget, retain


def prepare_forget_rows(d: C.DataConfig, rows: list[dict], tokenizer) -> list[dict]:
    """The forget rows as the benchmark trains on them once the tokenizer is known (MUSE-Books' raw
    text cut into ``data.max_length``-token chunks, the first ``data.limit``); others unchanged."""
    bench = get(d.benchmark, kind="data", key="data.benchmark")
    return bench.prepare_forget(d, rows, tokenizer) if bench.prepare_forget else rows


def encode(
    rows: Sequence[dict], formatter, *, source: str, length: int | None = None, strict: bool = False
) -> Batch:
    """Rows -> a fixed-shape batch ``[len(rows), T]`` (T: the longest row rounded up to 16).
    ``strict``: an unusable row is an error instead of being dropped (rows aligned to others)."""
    encoded, _ = formatter.encode_rows(rows, source=source, strict=strict)
    kept = [e for e in encoded if e is not None]
    t = length or bucket_length(max(len(e) for e in kept), 16, cap=formatter.max_length)
    return collate(kept, pad_id=formatter.pad_token_id, length=t)


def flat_templates(m: C.FLATConfig, d: C.DataConfig) -> list[str]:
    """FLAT's template answers: method.template file, else TOFU's idontknow.jsonl, else built-in."""
    return idk_answers(m.template, d, key="method.template")


def idk_answers(path: str | None, d: C.DataConfig, *, key: str = "method.idk") -> list[str]:
    """IdK answers: the file ``path`` (JSONL ``{"text": ...}``), else TOFU's idontknow.jsonl in the
    data folder, else a built-in refusal."""
    if path:
        rows = jsonl.load_user_rows(data_file(path, key), kind="text")
        return [r["text"] for r in rows]
    try:
        return tofu.load_idontknow(data_dir=benchmark_dir(d.data_dir, "tofu"))
    except DataError:
        return [BUILTIN_IDK]


def template_rows(
    forget_rows: Sequence[dict], templates: Sequence[str], *, per_epoch: bool, epochs: int, seed: int
) -> tuple[int, list[dict]]:
    """FLAT's template rows: ``(E, rows)`` with ``E`` blocks of one ``{"question", "answer"}`` row per
    forget row. ``per_epoch``: block e draws a new template for every row (``default_rng((seed, 2,
    e))``), as the official dataset draws ``torch.randint`` in each ``__getitem__`` (UCSC-REAL/FLAT
    data_module.py l. 623-625); otherwise one block, one template per row for the whole run."""
    n_blocks = max(1, int(epochs)) if per_epoch else 1
    rows = []
    for e in range(n_blocks):
        picks = np.random.default_rng((seed, 2, e)).integers(0, len(templates), size=len(forget_rows))
        rows += [
            {"question": r.get("question", ""), "answer": templates[j]} for r, j in zip(forget_rows, picks)
        ]
    return n_blocks, rows


def load_normal_file(path: str, num_forget: int, k_minus_1: int) -> list[dict]:
    """SGA normal samples from a JSONL file: line i is ``{"texts": [K-1 strings]}`` for forget row i
    (the paper generated MUSE / Harry Potter normal data with an external model). Returns the
    ``N·(K-1)`` ``{"text"}`` rows grouped by forget row; one clear error for a malformed file."""
    p = data_file(path, "method.normal_file")
    records = jsonl.read_records(p)
    if len(records) != num_forget:
        raise DataError(
            f"method.normal_file: {p} has {len(records)} lines; need one per forget row ({num_forget})"
        )
    rows = []
    for i, rec in enumerate(records):
        texts = rec.get("texts") if isinstance(rec, dict) else None
        if not (
            isinstance(texts, list)
            and len(texts) == k_minus_1
            and all(isinstance(t, str) and t for t in texts)
        ):
            raise DataError(
                f"method.normal_file: {p} line {i + 1} must be "
                f'{{"texts": [{k_minus_1} non-empty strings]}} (K-1 = {k_minus_1})'
            )
        rows += [{"text": t} for t in texts]
    return rows


def _row_key(row: dict) -> tuple[str, ...]:
    """A row's question / answer / text with whitespace runs collapsed and the ends stripped, so a
    forget row's near-copy (a trailing space, a doubled space, a newline) matches it."""
    return tuple(" ".join(str(row.get(k, "")).split()) for k in ("question", "answer", "text"))


def check_forget_answers(rows: Sequence[dict]) -> None:
    """One error for a forget row whose answer is empty (or only whitespace): it would train on the
    end-of-turn token alone."""
    for i, row in enumerate(rows):
        if "answer" in row and not str(row["answer"]).strip():
            raise DataError(
                f"data.forget: row {i} has an empty answer: there is nothing to unlearn in it (it would "
                "train on the end-of-turn token alone); fix or drop the row"
            )


def drop_forget_copies(forget: Sequence[dict], retain: Sequence[dict]) -> list[int]:
    """Indices of the ``retain`` rows to keep: those that are no forget row, up to whitespace. A
    method never descends (or takes as an SGA normal sample) a row it ascends; dropped rows are
    named in one warning line, and a retain set made only of forget rows is an error."""
    keys = {_row_key(r) for r in forget}
    copies = [j for j, r in enumerate(retain) if _row_key(r) in keys]
    if copies:
        print(
            f"sga-jax: warning: {len(copies)} retain rows are also forget rows (up to whitespace; first: "
            f"row {copies[0]}); they are dropped from the retain set",
            file=sys.stderr,
        )
    if len(copies) == len(retain):
        raise DataError("data.retain: every retain row is also a forget row; nothing is left to retain")
    dropped = set(copies)
    return [j for j in range(len(retain)) if j not in dropped]
