"""WMDP (Li et al. 2024, arXiv 2403.03218) multiple-choice format.

Rows ``{"question": str, "choices": [4 str], "answer": int in 0..3}``, read from a local JSON /
JSON-lines file or from ``datasets.load_dataset("cais/wmdp", "wmdp-bio" | "wmdp-chem" | "wmdp-cyber")``.
The prompt follows lm-evaluation-harness' WMDP task: the question, the lettered choices, and
"Answer:"; the model's choice is the letter with the highest log-probability.
"""

from __future__ import annotations

import os

from sga_jax.data.jsonl import Row, check_rows, read_records
from sga_jax.errors import DataError

HUB_NAME = "cais/wmdp"
HUB_CONFIGS = ("wmdp-bio", "wmdp-chem", "wmdp-cyber")
LETTERS = ("A", "B", "C", "D")


def load_wmdp(
    path_or_config: str | os.PathLike, *, source: str = "local", limit: int | None = None
) -> list[Row]:
    """Checked WMDP-format rows from a local file or (``source="hub"``) a ``cais/wmdp`` config."""
    if source == "hub":  # pragma: no cover - needs a network
        if path_or_config not in HUB_CONFIGS:
            raise DataError(f"unknown WMDP config {path_or_config!r}; use one of {HUB_CONFIGS}")
        try:
            import datasets

            rows = [dict(r) for r in datasets.load_dataset(HUB_NAME, path_or_config, split="test")]
        except Exception as e:
            raise DataError(f"cannot load {HUB_NAME}/{path_or_config} from the hub: {e}") from None
        where = f"{HUB_NAME}/{path_or_config}"
    elif source == "local":
        rows, where = read_records(path_or_config), str(path_or_config)
    else:
        raise DataError(f"unknown data source {source!r}; use 'local' or 'hub'")
    if limit is not None:
        rows = rows[:limit]
    rows = check_rows(
        rows,
        {"question": str, "choices": list, "answer": int},
        source=where,
        list_lengths={"choices": 4},
    )
    for i, r in enumerate(rows):
        if isinstance(r["answer"], bool) or not 0 <= r["answer"] < 4:
            raise DataError(f"{where}: row {i} key 'answer' is {r['answer']!r}, expected 0, 1, 2 or 3")
    return rows


def format_prompt(row: Row) -> str:
    """``question\\nA. c0\\nB. c1\\nC. c2\\nD. c3\\nAnswer:`` (the model answers with " A" ... " D")."""
    lines = [row["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def choice_continuations() -> list[str]:
    """The four scored continuations, with the leading space a BPE tokenizer expects."""
    return [f" {letter}" for letter in LETTERS]
