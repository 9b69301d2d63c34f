"""The options each benchmark of :func:`sga_jax.eval.run.evaluate` accepts, checked before anything runs.

``sga-jax eval MODEL -b tofu foo=1`` or ``limit=abc`` would otherwise fail as a TypeError deep in
the evaluation, after the model is loaded (and, as ``eval.options`` of a run config, after the
whole training run). :func:`check_options` names the key and what it must be; it imports nothing
heavy, so the config validation can call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sga_jax.errors import ConfigError

# A check returns None when the value is fine, else what the value must be.
Check = Callable[[Any], str | None]


def _whole(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
    return None if ok else "a whole number >= 1"


def _whole_or_null(v: Any) -> str | None:
    return None if v is None or _whole(v) is None else "a whole number >= 1 (or null)"


def _seed(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return None if ok else "a whole number >= 0"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "a non-empty string"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(choices)


def _fraction(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "a number in (0, 1]"


def _auc_or_null(v: Any) -> str | None:
    ok = v is None or (isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1)
    return None if ok else "an AUC in [0, 1] (or null)"


def _p_norm(v: Any) -> str | None:
    ok = v in (1, 2, "inf") and not isinstance(v, bool)
    return None if ok else '1, 2 or "inf"'


def _list_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, list | tuple) and v and all(x in choices for x in v)
        return None if ok else "a non-empty list of " + ", ".join(choices)

    return check


# The prompt formats of sga_jax.data.formatting.TEMPLATES (a test checks they agree), spelled out so
# that reading a config imports no tokenizer code.
PROMPT_FORMATS = ("auto", "chat", "plain", "gemma3", "qwen3")

_COMMON: dict[str, Check] = {"limit": _whole_or_null, "data_dir": _text, "source": _one_of("local", "hub")}

_MUSE: dict[str, Check] = {
    "metrics": _list_of(
        "verbmem_f", "knowmem_f", "knowmem_r", "privleak", "extraction_strength", "exact_memorization"
    ),
    "retrain_auc": _auc_or_null,
    "batch_size": _whole,
    "progress": _flag,
    "hub_repo": _text,
}

OPTIONS: dict[str, dict[str, Check]] = {
    "tofu": {
        "forget_split": _one_of("forget01", "forget05", "forget10"),
        "template": _one_of(*PROMPT_FORMATS),
        "max_length": _whole,
        "batch_size": _whole,
        "generate": _flag,
        "max_new_tokens": _whole,
        "generation_max_length": _whole,
        "generation_batch_size": _whole_or_null,
        "progress": _flag,
        "retain_logs": _text,
        "retain_subset": _whole_or_null,
        "subset_seed": _seed,
        "hub_repo": _text,
        "memorization": _flag,
        "retain_model": _text,
    },
    "muse_news": _MUSE,
    "muse_books": _MUSE,  # the same evaluation on the Books corpus
    "ppl": {"data": _text, "max_length": _whole, "batch_size": _whole},
    "mia": {
        "members": _text,
        "nonmembers": _text,
        "k": _fraction,
        "max_length": _whole,
        "batch_size": _whole,
        "gradnorm_p": _p_norm,
        "reference_model": _text,
    },
    "wmdp": {"data": _text, "batch_size": _whole},
}


def check_options(benchmark: str, options: Mapping[str, Any], *, where: str = "option") -> None:
    """Raise a ConfigError naming the first option ``benchmark`` does not know, or whose value is
    of the wrong kind (``where`` prefixes the key in the message, e.g. ``eval.options``)."""
    known = {**_COMMON, **OPTIONS.get(benchmark, {})}
    for key, value in options.items():
        if key not in known:
            raise ConfigError(
                f"{where} {key!r}: not an option of the {benchmark} evaluation; "
                f"its options are {', '.join(sorted(known))}"
            )
        want = known[key](value)
        if want is not None:
            raise ConfigError(f"{where} {key}={value!r}: must be {want}")


__all__ = ["OPTIONS", "check_options"]
