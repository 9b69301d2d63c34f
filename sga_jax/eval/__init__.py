"""Evaluation: greedy generation (``generate``), TOFU (``tofu``), MUSE (``muse``), membership
inference and perplexity (``mia``), and the ``run.evaluate`` entry point. Submodules import lazily."""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("generate", "tofu", "muse", "mia", "run", "scoring", "flops")
__all__ = [*_SUBMODULES, "evaluate"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"sga_jax.eval.{name}")
    if name == "evaluate":
        return importlib.import_module("sga_jax.eval.run").evaluate
    raise AttributeError(f"module 'sga_jax.eval' has no attribute {name!r}")
