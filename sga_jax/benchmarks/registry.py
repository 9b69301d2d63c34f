"""The benchmark registry: one :class:`Benchmark` entry per benchmark, found by name.

An entry holds everything the rest of the library asks about a benchmark: its training-data loader
(``data.benchmark``), its evaluation runner and typed options (``sga-jax eval --benchmark``,
``eval.benchmark``), the files its evaluation writes, the result keys it always reports, its data
folder under the data root, its default row limit and its other names (``tofu_forget05``).

Adding a benchmark is one module in :mod:`sga_jax.benchmarks` that calls :func:`register` (found
there by :func:`pkgutil.iter_modules`, so no list elsewhere names it), plus its configs and tests.
A package outside sga_jax registers its own through the ``sga_jax.benchmarks`` entry-point group.

Registration modules import nothing heavy at module level: the config validation and the CLI's
argument checks read the registry, and ``sga-jax --help`` stays instant. Their runners import the
evaluation code when they run.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NamedTuple

from sga_jax.errors import ConfigError

# A check returns None when the value is fine, else what the value must be (sga_jax.eval.options).
Check = Callable[[Any], "str | None"]
Rows = list[dict]


class EvalRun(NamedTuple):
    """What every benchmark's evaluation runner gets: the model, its tokenizer, the output folder,
    the common options (already popped) and the benchmark's own options (each runner pops what it
    reads)."""

    model: Any
    tokenizer: Any
    out: Path
    limit: int | None
    source: str
    data_dir: Any
    options: dict[str, Any]
    model_path: str = ""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    ``run(EvalRun) -> results`` evaluates a model (None: a data-only benchmark such as ``jsonl``);
    ``options`` are its evaluation options besides the common ``limit`` / ``data_dir`` / ``source``;
    ``load_rows(data_config, where, need_retain) -> (forget, retain | None)`` reads its training rows
    (None: it has none), with ``where`` the data folder (or the hub source) and ``limit``;
    ``prepare_forget(data_config, rows, tokenizer)`` reshapes the forget rows once a tokenizer is
    known (MUSE-Books' chunking); ``options_from_data(data_config)`` gives the evaluation options a
    run's own ``data`` section implies when it trains on this benchmark; ``data_folder`` is its folder
    under the data root (None: it reads no benchmark data folder and has no hub copy); ``writes`` the
    files its evaluation writes besides results.json; ``result_keys`` the keys its results always
    hold; ``aliases`` other names with the options they preset; ``help`` its lines in
    ``sga-jax eval --help``; ``loads_model=False``: its runner loads the model itself from
    ``EvalRun.model_path`` (lm-eval's backend), so :func:`sga_jax.eval.run.evaluate` does not.
    """

    name: str
    run: Callable[[EvalRun], dict[str, Any]] | None = None
    options: Mapping[str, Check] = field(default_factory=dict)
    load_rows: Callable[[Any, dict[str, Any], bool], tuple[Rows, Rows | None]] | None = None
    prepare_forget: Callable[[Any, Rows, Any], Rows] | None = None
    options_from_data: Callable[[Any], dict[str, Any]] | None = None
    data_folder: str | None = None
    writes: tuple[str, ...] = ()
    result_keys: tuple[str, ...] = ()
    default_limit: int | None = None
    aliases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    help: str = ""
    loads_model: bool = True


_REGISTRY: dict[str, Benchmark] = {}
_ALIASES: dict[str, tuple[str, Mapping[str, Any]]] = {}
_loaded = False


def register(benchmark: Benchmark) -> Benchmark:
    """Add ``benchmark`` to the registry (a second entry under one name is a programming error)."""
    for name in (benchmark.name, *benchmark.aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"benchmark {name!r} is registered twice")
    _REGISTRY[benchmark.name] = benchmark
    for alias, preset in benchmark.aliases.items():
        _ALIASES[alias] = (benchmark.name, preset)
    return benchmark


def _load() -> None:
    """Import the registration modules once: sga_jax.benchmarks.*, then the entry-point group."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import sga_jax.benchmarks as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name != "registry":
            importlib.import_module(f"{package.__name__}.{info.name}")
    for ep in entry_points(group="sga_jax.benchmarks"):
        ep.load()


def names(kind: str = "any") -> tuple[str, ...]:
    """The registered benchmarks' names: ``"eval"`` those that evaluate, ``"data"`` those with
    training data, ``"any"`` all."""
    _load()
    keep = {
        "any": lambda b: True,
        "eval": lambda b: b.run is not None,
        "data": lambda b: b.load_rows is not None,
    }
    return tuple(n for n, b in _REGISTRY.items() if keep[kind](b))


def get(name: str, *, kind: str = "any", key: str = "benchmark") -> Benchmark:
    """The benchmark called ``name`` (not an alias), or one ConfigError naming ``key`` and the choices."""
    _load()
    if name not in names(kind):
        raise ConfigError(f"{key}: unknown benchmark {name!r}; choose one of {', '.join(names(kind))}")
    return _REGISTRY[name]


def resolve(name: str, *, key: str = "--benchmark") -> tuple[Benchmark, dict[str, Any]]:
    """An evaluation's benchmark from a name or an alias, with the options the alias presets."""
    _load()
    if name in _ALIASES:
        base, preset = _ALIASES[name]
        return _REGISTRY[base], dict(preset)
    return get(name, kind="eval", key=key), {}


def eval_help() -> str:
    """Every evaluating benchmark's ``help`` lines, for ``sga-jax eval --help``."""
    _load()
    return "\n".join(b.help for b in _REGISTRY.values() if b.run is not None and b.help)


__all__ = ["Benchmark", "EvalRun", "eval_help", "get", "names", "register", "resolve"]
