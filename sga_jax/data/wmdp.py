"""WMDP (Li et al. 2024, arXiv 2403.03218) multiple-choice format.

Rows ``{"question": str, "choices": [4 str], "answer": int in 0..3}``, read from a local JSON /
JSON-lines file or from ``datasets.load_dataset("cais/wmdp", "wmdp-bio" | "wmdp-chem" | "wmdp-cyber")``.
The prompt follows lm-evaluation-harness' WMDP task: the question, the lettered choices, and
"Answer:"; the model's choice is the letter with the highest log-probability.
"""

from __future__ import annotations

import os
from pathlib import Path

from sga_jax.data.jsonl import Row, check_rows, read_records
from sga_jax.errors import DataError
from sga_jax.paths import data_root

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


# ---------------------------------------------------------------------------------- unlearning corpora
# RMU's corpora (centerforaisafety/wmdp rmu/utils.py get_data and the README's "Datasets"): the forget
# corpora are PubMed papers (bio, gated: request access at wmdp.ai) and GitHub passages (cyber); the
# retain corpus of the paper's RMU runs is Wikitext-2 (raw, test split). name -> (hub id, config, split).
CORPUS_HUB = {
    "bio-forget-corpus": ("cais/wmdp-bio-forget-corpus", None, "train"),  # gated
    "bio-retain-corpus": ("cais/wmdp-corpora", "bio-retain-corpus", "train"),
    "cyber-forget-corpus": ("cais/wmdp-corpora", "cyber-forget-corpus", "train"),
    "cyber-retain-corpus": ("cais/wmdp-corpora", "cyber-retain-corpus", "train"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
}


def _corpus_hub(name: str) -> tuple[list[dict], str]:  # pragma: no cover - needs a network
    repo, config, split = CORPUS_HUB[name]
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        gated = (
            " (gated: request access at https://www.wmdp.ai, then `hf auth login`)" if "bio-f" in name else ""
        )
        raise DataError(
            f"cannot load {repo} {config or ''}/{split}{gated}: {' '.join(str(e).split())}"
        ) from None
    return [dict(r) for r in ds], f"{repo}/{config or ''}/{split}"


def load_corpus(
    name: str, *, source: str = "local", data_dir: str | os.PathLike | None = None,
    limit: int | None = None, min_chars: int = 0,
) -> list[Row]:  # fmt: skip
    """``{"text"}`` rows of an RMU corpus: ``name`` one of :data:`CORPUS_HUB` (from the hub with
    ``source="hub"``; locally ``data_dir/<name>.jsonl``, as RMU's ``data/`` folder) or the path of a
    JSON / JSONL file of ``{"text"}`` rows. Rows of ``min_chars`` characters or fewer are dropped,
    as RMU's ``len(text) > min_len`` (its default 0 drops Wikitext's empty lines); then ``limit``."""
    if source == "hub" and name in CORPUS_HUB:
        rows, where = _corpus_hub(name)
    else:
        path = Path(name).expanduser()
        if name in CORPUS_HUB:
            root = Path(data_dir).expanduser() if data_dir is not None else data_root(required=False)
            if root is None:
                raise DataError(
                    f"WMDP corpus {name!r}: set data.data_dir (a folder holding {name}.jsonl) "
                    "or data.source=hub"
                )
            path = (
                root / f"{name}.jsonl"
                if (root / f"{name}.jsonl").is_file()
                else root / "wmdp" / f"{name}.jsonl"
            )
        elif not path.suffix:
            raise DataError(
                f"unknown WMDP corpus {name!r}; use one of {', '.join(CORPUS_HUB)} or a file path"
            )
        rows, where = read_records(path), str(path)
    rows = check_rows(rows, {"text": str}, source=where)
    rows = [{"text": r["text"]} for r in rows if len(r["text"]) > min_chars]
    if not rows:
        raise DataError(f"{where}: no text longer than {min_chars} characters")
    return rows[:limit] if limit else rows
