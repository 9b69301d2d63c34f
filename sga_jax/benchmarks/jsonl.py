"""Your own rows: ``data.forget`` / ``data.retain`` are JSONL (or JSON) files of
``{"question", "answer"}`` or ``{"text"}`` rows. Training data only; evaluate with ``ppl`` / ``mia``."""

from __future__ import annotations

from typing import Any

from sga_jax.benchmarks.registry import Benchmark, register
from sga_jax.errors import ConfigError


def _rows(d: Any, where: dict[str, Any], need_retain: bool) -> tuple[list[dict], list[dict] | None]:
    from sga_jax.data import jsonl
    from sga_jax.data.splits import data_file

    forget = jsonl.load_user_rows(data_file(d.forget, "data.forget"))[: d.limit]
    if not need_retain:
        return forget, None
    if not d.retain:
        raise ConfigError("data.retain: this method needs a retain file (data.retain=PATH)")
    return forget, jsonl.load_user_rows(data_file(d.retain, "data.retain"))[: d.limit]


JSONL = register(Benchmark(name="jsonl", load_rows=_rows))
