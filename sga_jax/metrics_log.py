"""A run's step log: ``metrics.jsonl`` (one JSON object per logged step, trimmed on resume to the
steps the resumed run will not write again) and TensorBoard scalars when tensorboardX is installed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sga_jax.fsutil import atomic_write_text, faults_at, open_nofollow, refuse_link


def _logged_step(line: str) -> float:
    """A metrics line's step; a cut-off (killed mid-write) or foreign line counts as never logged."""
    try:
        rec = json.loads(line)
        return float(rec.get("step", 0)) if isinstance(rec, dict) else math.inf
    except (ValueError, TypeError):
        return math.inf


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard when installed."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        refuse_link(path, "metrics log")  # written through, a link would replace the file it names
        if path.exists():  # drop lines a resumed run will write again
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= resume_step]
            atomic_write_text(path, "".join(x + "\n" for x in kept))
        fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what="metrics log")
        self._file = os.fdopen(fd, "a")
        self._tb = None
        try:  # optional: TensorBoard scalars when tensorboardX is installed
            from tensorboardX import SummaryWriter  # type: ignore[import-not-found]

            self._tb = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        with faults_at(self.path):  # a failed buffered write names no file: name ours
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        with faults_at(self.path):
            self._file.close()
        if self._tb is not None:
            self._tb.close()


__all__ = ["MetricsLog"]
