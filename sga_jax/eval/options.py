"""The options each benchmark of :func:`sga_jax.eval.run.evaluate` accepts, checked before anything runs.

``sga-jax eval MODEL -b tofu foo=1`` or ``limit=abc`` would otherwise fail as a TypeError deep in
the evaluation, after the model is loaded (and, as ``eval.options`` of a run config, after the
whole training run). :func:`check_options` names the key and what it must be; it imports nothing
heavy, so the config validation can call it. Each benchmark declares its options in its registry
entry (:mod:`sga_jax.benchmarks`) with the checks below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sga_jax.benchmarks.registry import Check, get
from sga_jax.errors import ConfigError


def whole(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
    return None if ok else "a whole number >= 1"


def whole_or_null(v: Any) -> str | None:
    return None if v is None or whole(v) is None else "a whole number >= 1 (or null)"


def seed(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return None if ok else "a whole number >= 0"


def flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "a non-empty string"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(choices)


def fraction(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "a number in (0, 1]"


def auc_or_null(v: Any) -> str | None:
    ok = v in (None, "official") or (isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1)
    return None if ok else 'an AUC in [0, 1], "official" (the benchmark\'s own retrain model) or null'


def p_norm(v: Any) -> str | None:
    ok = v in (1, 2, "inf") and not isinstance(v, bool)
    return None if ok else '1, 2 or "inf"'


def names(v: Any) -> str | None:
    ok = isinstance(v, list | tuple) and v and all(isinstance(x, str) and x for x in v)
    ok = ok or (isinstance(v, str) and all(v.split(",")))
    return None if ok else "a non-empty list of names (or one comma-separated string)"


def list_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, list | tuple) and v and all(x in choices for x in v)
        return None if ok else "a non-empty list of " + ", ".join(choices)

    return check


# The prompt formats of sga_jax.data.formatting.TEMPLATES (a test checks they agree), spelled out so
# that reading a config imports no tokenizer code.
PROMPT_FORMATS = ("auto", "chat", "plain", "gemma3", "qwen3")

COMMON: dict[str, Check] = {"limit": whole_or_null, "data_dir": text, "source": one_of("local", "hub")}


def check_options(benchmark: str, options: Mapping[str, Any], *, where: str = "option") -> None:
    """Raise a ConfigError naming the first option ``benchmark`` does not know, or whose value is
    of the wrong kind (``where`` prefixes the key in the message, e.g. ``eval.options``)."""
    known = {**COMMON, **get(benchmark, kind="eval").options}
    for key, value in options.items():
        if key not in known:
            raise ConfigError(
                f"{where} {key!r}: not an option of the {benchmark} evaluation; "
                f"its options are {', '.join(sorted(known))}"
            )
        want = known[key](value)
        if want is not None:
            raise ConfigError(f"{where} {key}={value!r}: must be {want}")


__all__ = [
    "COMMON", "PROMPT_FORMATS", "auc_or_null", "check_options", "flag", "fraction", "list_of", "names",
    "one_of", "p_norm", "seed", "text", "whole", "whole_or_null",
]  # fmt: skip
