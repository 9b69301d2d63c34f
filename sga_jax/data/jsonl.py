"""Reading JSON / JSON-lines record files with errors that name the file, row and key.

Benchmarks ship both layouts under the same ``.json`` suffix (TOFU's ``retain_perturbed.json`` is JSON
lines), so :func:`read_records` sniffs the first non-blank character: ``[`` = one JSON list, anything
else = one JSON value per line. User forget / retain files hold ``{"question", "answer"}`` or
``{"text"}`` rows (:func:`load_user_rows`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sga_jax.errors import DataError

Row = dict[str, Any]


def read_records(path: str | os.PathLike) -> list[Any]:
    """All records of a JSON list file or a JSON-lines file (blank lines skipped).

    Raises DataError for a missing file, a parse error (with the line number) or an empty file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {p}: {e}") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"data file is empty: {p}")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: invalid JSON on line {lineno}: {e.msg}") from None
    if not records:
        raise DataError(f"data file has no rows: {p}")
    return records


def check_rows(
    rows: Sequence[Any],
    required: dict[str, type | tuple[type, ...]],
    *,
    source: str,
    list_lengths: dict[str, int] | None = None,
) -> list[Row]:
    """Check that every row is a dict with the ``required`` keys of the right types.

    ``list_lengths`` optionally fixes the length of list-valued keys (e.g. 5 perturbed answers).
    The error names the source, the row index (0-based) and the offending key.
    """
    if len(rows) == 0:
        raise DataError(f"{source}: the split is empty")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i} is a {type(row).__name__}, expected an object")
        for key, typ in required.items():
            if key not in row:
                raise DataError(f"{source}: row {i} has no key {key!r} (keys: {sorted(row)})")
            value = row[key]
            if not isinstance(value, typ):
                raise DataError(
                    f"{source}: row {i} key {key!r} is a {type(value).__name__}, expected {_type_name(typ)}"
                )
            if isinstance(value, str):
                _check_text(value, f"{source}: row {i} key {key!r}")
            if isinstance(value, list):
                for j, v in enumerate(value):
                    if isinstance(v, str):
                        _check_text(v, f"{source}: row {i} key {key!r} item {j}")
                bad = [j for j, v in enumerate(value) if not isinstance(v, str)]
                if bad:
                    raise DataError(f"{source}: row {i} key {key!r} item {bad[0]} is not a string")
                want = (list_lengths or {}).get(key)
                if want is not None and len(value) != want:
                    raise DataError(f"{source}: row {i} key {key!r} has {len(value)} items, expected {want}")
        out.append(row)
    return out


def _check_text(text: str, where: str) -> None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer can encode: refuse them
    here, naming the row, rather than as a UnicodeEncodeError deep inside tokenization."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
            "which is not valid Unicode text"
        ) from None


def _type_name(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


def load_user_rows(path: str | os.PathLike, *, kind: str = "auto") -> list[Row]:
    """A user's own forget / retain file: rows ``{"question", "answer"}`` (``kind="qa"``) or
    ``{"text"}`` (``kind="text"``); ``"auto"`` decides from the first row. Other keys are kept."""
    records = read_records(path)
    if kind == "auto":
        first = records[0]
        if isinstance(first, dict) and "question" in first:
            kind = "qa"
        elif isinstance(first, dict) and "text" in first:
            kind = "text"
        else:
            raise DataError(
                f"{path}: row 0 has neither 'question'/'answer' nor 'text' keys; "
                'expected rows like {"question": ..., "answer": ...} or {"text": ...}'
            )
    if kind == "qa":
        return check_rows(records, {"question": str, "answer": str}, source=str(path))
    if kind == "text":
        return check_rows(records, {"text": str}, source=str(path))
    raise DataError(f"unknown row kind {kind!r}; use 'auto', 'qa' or 'text'")


def strings_to_rows(strings: Iterable[Any], *, source: str, key: str = "text") -> list[Row]:
    """A JSON list of strings (MUSE corpora, TOFU's idontknow) -> ``[{key: s}, ...]``."""
    rows = []
    for i, s in enumerate(strings):
        if isinstance(s, dict) and isinstance(s.get(key), str):  # hub layout already keyed
            rows.append(s)
            continue
        if not isinstance(s, str):
            raise DataError(f"{source}: row {i} is a {type(s).__name__}, expected a string")
        rows.append({key: s})
    if not rows:
        raise DataError(f"{source}: the split is empty")
    return rows


def write_json_atomic(obj: Any, path: str | os.PathLike, **dump_kwargs: Any) -> Path:
    """Write JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    from sga_jax.fsutil import atomic_write_text  # an unpredictable temporary name: no link followed

    atomic_write_text(p, json.dumps(obj, **dump_kwargs))
    return p
