"""Text sets named by a short spec, for perplexity and membership inference: a file path,
``tofu:<config>``, ``muse:raw[/split]`` or ``muse:privleak/<split>`` (MUSE-News)."""

from __future__ import annotations

from typing import Any

from sga_jax.data import muse as muse_data
from sga_jax.data import tofu as tofu_data
from sga_jax.data.jsonl import load_user_rows
from sga_jax.errors import ConfigError


def load_texts(spec: str, limit: int | None, data_dir: Any = None) -> list[str]:
    """The texts named by ``spec`` (the first ``limit``). QA rows become ``"{question} {answer}"``."""
    if spec.startswith("tofu:"):
        rows = tofu_data.load_tofu(spec[5:], data_dir=data_dir, limit=limit)
    elif spec.startswith("muse:"):
        part, _, split = spec[5:].partition("/")
        if part == "raw":
            rows = muse_data.load_raw(split or "forget", data_dir=data_dir, limit=limit)
        elif part == "privleak":
            rows = muse_data.load_privleak(split or "forget", data_dir=data_dir, limit=limit)
        else:
            raise ConfigError(
                f"unknown MUSE text set {spec!r}; use muse:raw[/split] or muse:privleak/<split>"
            )
    else:
        rows = load_user_rows(spec)
        rows = rows[:limit] if limit else rows
    return [r["text"] if "text" in r else f"{r['question']} {r['answer']}" for r in rows]


__all__ = ["load_texts"]
