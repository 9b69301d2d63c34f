"""MUSE (Shi et al. 2024, arXiv 2407.06460): the News (BBC) and Books (Harry Potter) corpora.

Local layout (the official MUSE repository's ``data/news`` and ``data/hp``)::

    knowmem/{forget_qa,retain2_qa,forget_qa_icl,retain2_qa_icl}.json   [{question, answer}]
    verbmem/forget.json                                                [{prompt, gt}]
    privleak/{forget,holdout,retain2}.json                             [str]
    raw/forget.json (News) or raw/forget.txt (Books; one plain text)   [str]
    raw/retain1 / retain2 / holdout.json where available               [str]

``corpus``: ``"news"`` (folder ``muse_news/``, hub ``muse-bench/MUSE-News``) or ``"books"``
(``muse_books/``, ``muse-bench/MUSE-Books``). ``source="hub"`` reads the same splits from the hub
(configs ``knowmem``, ``verbmem``, ``privleak``, ``raw``; the hub names the retain QA split
``retain_qa``). Books' raw forget text is cut into token chunks by :func:`chunk_text`, as MUSE's
training does.
"""

from __future__ import annotations

import os
from pathlib import Path

from sga_jax.data.jsonl import Row, check_rows, read_records, strings_to_rows
from sga_jax.errors import DataError
from sga_jax.paths import data_root

HUB_NAME = "muse-bench/MUSE-News"
# corpus -> (folder under the data root, hub dataset id)
CORPORA = {"news": ("muse_news", HUB_NAME), "books": ("muse_books", "muse-bench/MUSE-Books")}

KNOWMEM_SPLITS = {"forget": "forget_qa", "retain": "retain2_qa", "retain2": "retain2_qa"}
PRIVLEAK_SPLITS = ("forget", "holdout", "retain", "retain2")
RAW_SPLITS = ("forget", "retain1", "retain2", "holdout")


def _corpus(corpus: str) -> tuple[str, str]:
    if corpus not in CORPORA:
        raise DataError(f"unknown MUSE corpus {corpus!r}; use one of {', '.join(CORPORA)}")
    return CORPORA[corpus]


def _root(data_dir: str | os.PathLike | None, corpus: str = "news") -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root, folder = data_root(), _corpus(corpus)[0]
    return root / folder if (root / folder).is_dir() else root


def _file(data_dir, *parts: str, corpus: str = "news") -> Path:
    path = _root(data_dir, corpus).joinpath(*parts)
    if not path.is_file():
        raise DataError(
            f"{_corpus(corpus)[1]} split file not found: {path} (set SGA_JAX_DATA_DIR or use source='hub')"
        )
    return path


def _hub(config: str, split: str, repo: str | None = None, corpus: str = "news") -> tuple[list[Row], str]:
    """``(rows, where)``: ``datasets.load_dataset(repo, config, split=split)`` and the name its rows
    are reported under; ``repo``: the hub id (default the corpus's, :data:`CORPORA`) or a local
    folder holding a copy of that dataset repository."""
    repo = repo or _corpus(corpus)[1]
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        raise DataError(
            f"cannot load {repo} {config}/{split} with datasets: {' '.join(str(e).split())}"
        ) from None
    return [dict(r) for r in ds], f"{repo}/{config}/{split}"


def _limit(rows: list, limit: int | None) -> list:
    if limit is None:
        return rows
    if limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    return rows[:limit]


def load_knowmem(
    split: str = "forget",
    *,
    icl: bool = False,
    source: str = "local",
    data_dir=None,
    limit=None,
    hub_repo=None,
    corpus: str = "news",
) -> list[Row]:
    """KnowMem QA rows ``{question, answer}`` of ``split`` ("forget" or "retain"), or its
    in-context few-shot examples when ``icl``."""
    if split not in KNOWMEM_SPLITS:
        raise DataError(f"unknown KnowMem split {split!r}; use 'forget' or 'retain'")
    name = KNOWMEM_SPLITS[split] + ("_icl" if icl else "")
    if source == "hub":
        hub_split = name.replace("retain2", "retain")
        rows, where = _hub("knowmem", hub_split, hub_repo, corpus)
    else:
        path = _file(data_dir, "knowmem", f"{name}.json", corpus=corpus)
        rows, where = read_records(path), str(path)
    return check_rows(_limit(rows, limit), {"question": str, "answer": str}, source=where)


def load_verbmem(
    *, source: str = "local", data_dir=None, limit=None, hub_repo=None, corpus: str = "news"
) -> list[Row]:
    """VerbMem rows ``{prompt, gt}``: the start of a forget text and its true continuation."""
    if source == "hub":
        rows, where = _hub("verbmem", "forget", hub_repo, corpus)
    else:
        path = _file(data_dir, "verbmem", "forget.json", corpus=corpus)
        rows, where = read_records(path), str(path)
    return check_rows(_limit(rows, limit), {"prompt": str, "gt": str}, source=where)


def load_privleak(
    split: str, *, source: str = "local", data_dir=None, limit=None, hub_repo=None, corpus: str = "news"
) -> list[Row]:
    """PrivLeak texts ``{text}`` of ``split``: "forget" (members), "holdout" (non-members), "retain"."""
    if split not in PRIVLEAK_SPLITS:
        raise DataError(f"unknown PrivLeak split {split!r}; use one of {PRIVLEAK_SPLITS}")
    if source == "hub":
        hub_split = "retain" if split == "retain2" else split
        rows, where = _hub("privleak", hub_split, hub_repo, corpus)
    else:
        local = "retain2" if split == "retain" else split
        path = _file(data_dir, "privleak", f"{local}.json", corpus=corpus)
        rows, where = read_records(path), str(path)
    return strings_to_rows(_limit(rows, limit), source=where)


def load_raw(
    split: str = "forget", *, source: str = "local", data_dir=None, limit=None, hub_repo=None, corpus="news"
) -> list[Row]:
    """A raw MUSE corpus ``{text}`` (the forget corpus by default). A split stored as plain text
    (Books' ``raw/forget.txt``) is one row holding the whole text: cut it with :func:`chunk_text`."""
    if split not in RAW_SPLITS:
        raise DataError(f"unknown raw split {split!r}; use one of {RAW_SPLITS}")
    if source == "hub":
        rows, where = _hub("raw", split, hub_repo, corpus)
    elif (
        not (_root(data_dir, corpus) / "raw" / f"{split}.json").is_file()
        and (txt := _root(data_dir, corpus) / "raw" / f"{split}.txt").is_file()
    ):
        rows, where = [txt.read_text(encoding="utf-8")], str(txt)
    else:
        path = _file(data_dir, "raw", f"{split}.json", corpus=corpus)
        rows, where = read_records(path), str(path)
    return strings_to_rows(_limit(rows, limit), source=where)


def chunk_tokens(tokens: list[int], max_length: int, prefix: list[int] = ()) -> list[list[int]]:
    """MUSE's training chunks of a tokenised text (jaechan-repo/muse_bench @54719c5,
    ``baselines/baselines/dataset.py`` l. 56-77, ``DefaultDataset`` on a ``.txt`` file): the tokens
    cut into consecutive pieces of ``max_length - len(prefix)``, each led by ``prefix`` (MUSE: the
    BOS token, ``add_bos_token``); the last piece, if short, is filled up to ``max_length`` with the
    first piece's tokens ("rotate"). Every chunk is ``<= max_length`` tokens."""
    prefix = list(prefix)
    step = max_length - len(prefix)
    if step < 1:
        raise DataError(f"max_length={max_length} leaves no room after {len(prefix)} prefix tokens")
    if not tokens:
        raise DataError("the text to chunk has no tokens")
    chunks = [prefix + list(tokens[i : i + step]) for i in range(0, len(tokens), step)]
    if len(chunks[-1]) < max_length:
        chunks[-1] = (chunks[-1] + chunks[0])[:max_length]
    return chunks


def chunk_text(text: str, tokenizer, max_length: int) -> list[Row]:
    """Rows ``{"text", "input_ids"}`` of MUSE's training chunks of ``text`` (:func:`chunk_tokens`):
    the whole text tokenised without special tokens, each chunk led by the tokenizer's own special
    prefix (its BOS, if it adds one; MUSE adds Llama's BOS); ``text``: the chunk decoded, as
    ``DefaultDataset.strings`` (``batch_decode(..., skip_special_tokens=True)``)."""
    tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    chunks = chunk_tokens(tokens, max_length, prefix)
    texts = tokenizer.batch_decode(chunks, skip_special_tokens=True)
    return [{"text": t, "input_ids": ids} for t, ids in zip(texts, chunks)]
