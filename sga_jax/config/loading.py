"""Composition of a :class:`~sga_jax.config.RunConfig` from defaults, YAML files and command-line
overrides, with the checks no single section states; YAML / dict output (jax-free).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from sga_jax.config.method_base import check as _check
from sga_jax.config.methods import GROUPS, GAConfig, method_schema
from sga_jax.config.sections import RunConfig
from sga_jax.errors import ConfigError

# ---------------------------------------------------------------------------------------- loading


def configs_root() -> Path:
    """The shipped YAML configs (``configs/`` of the checkout, or ``sga_jax/configs`` when installed)."""
    here = Path(__file__).resolve().parents[1]  # sga_jax/ (this file is sga_jax/config/loading.py)
    for candidate in (here.parent / "configs", here / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("the configs/ folder of sga_jax is missing from this installation")


def _group_file(group: str, name: str, *, key: str | None = None) -> Path:
    root = configs_root() / group
    path = root / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in root.glob("*.yaml"))
        hint = difflib.get_close_matches(name, choices, n=1)
        raise ConfigError(
            f"{key or group}={name}: no such {group} config"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; available: {', '.join(choices)}"
        )
    return path


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its ``defaults`` list (``group/name`` entries or paths) merged underneath."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through its defaults list")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: report the file, not a traceback
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
    defaults = node.pop("defaults", [])
    if not isinstance(defaults, ListConfig | list):
        raise ConfigError(f"{path}: defaults must be a list of config names, got {defaults!r}")
    merged = OmegaConf.create({})
    for entry in defaults:
        entry = str(entry)
        if "/" in entry and entry.split("/", 1)[0] in GROUPS and not entry.endswith(".yaml"):
            group, name = entry.split("/", 1)
            child = _load_yaml(_group_file(group, name), (*seen, path.resolve()))
        else:
            child = _load_yaml(path.parent / entry, (*seen, path.resolve()))
        merged = OmegaConf.merge(merged, child)
    return OmegaConf.merge(merged, node)


def _with_recipe(raw: DictConfig) -> DictConfig:
    """``raw`` over the ``train`` keys of its method's recipe (``method.recipe``): the recipe is the
    lowest layer above the dataclass defaults, so any ``train`` key set anywhere wins over it."""
    name = OmegaConf.select(raw, "method.recipe", default=None)
    if name is None:
        return raw
    node = _load_yaml(_group_file("recipe", str(name), key="method.recipe"))
    if set(node) - {"train"}:
        raise ConfigError(f"recipe {name}: a recipe holds only a train section, got {sorted(node)}")
    return OmegaConf.merge(node, raw)


def _merge_override(raw: DictConfig, item: str) -> DictConfig:
    """Apply one ``key=value`` override; ``method=NAME`` replaces the whole method section (its
    schema changes with the method), other group choices merge their file."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. method.r=-0.8)")
    key, _, value = item.partition("=")
    key = key.strip()
    if key in GROUPS:
        node = _load_yaml(_group_file(key, value.strip()))
        if key == "method":
            raw = OmegaConf.merge(raw, {})
            raw.pop("method", None)
        return OmegaConf.merge(raw, node)
    try:
        node = OmegaConf.from_dotlist([f"{key}={value}"])
    except Exception as e:
        raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    return OmegaConf.merge(raw, node)


def _oc_message(e: Exception, prefix: str = "") -> str:
    """One line from an OmegaConf error, naming the full key (``prefix`` + the node's own key)."""
    key = getattr(e, "full_key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (key or prefix)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if isinstance(e, oc_errors.ConfigKeyError | oc_errors.ConfigAttributeError):
        parent, _, leaf = key.rpartition(".")
        obj_type = getattr(e, "object_type", None)
        choices = [f.name for f in dataclasses.fields(obj_type)] if dataclasses.is_dataclass(obj_type) else []
        hint = difflib.get_close_matches(leaf, choices, n=1)
        where = f" in {parent}" if parent else ""
        return (
            f"unknown config key {key!r}{where}"
            + (f" (did you mean {(parent + '.' if parent else '') + hint[0]!r}?)" if hint else "")
            + (f"; valid keys: {', '.join(choices)}" if choices and not hint else "")
        )
    if isinstance(e, oc_errors.MissingMandatoryValue):
        return f"{key} is required (set it in the config or on the command line: {key}=...)"
    if isinstance(e, oc_errors.ValidationError):
        value = getattr(e, "value", None)
        return f"{key}: wrong type or value {value!r} ({msg})" if key else msg
    return f"{key}: {msg}" if key else msg


def _method_section(raw: DictConfig) -> DictConfig:
    """Merge the user's method section onto the schema its ``name`` (and ``base``) selects."""
    section = raw.get("method") if "method" in raw else None
    section = section if section is not None else OmegaConf.create({})
    name = section.get("name", "sga")
    base = section.get("base", None)
    schema = OmegaConf.structured(method_schema(name, base))
    return OmegaConf.merge(schema, section)


def compose(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | DictConfig | None = None,
) -> RunConfig:
    """Defaults ← ``base`` ← each file ← each override; validated into a :class:`RunConfig`.

    Raises ConfigError (one line naming the key) for an unknown key, a wrong type, an out-of-range
    value, an unknown method, a missing file or a malformed override.
    """
    raw = OmegaConf.create(dict(base) if isinstance(base, Mapping) else (base or {}))
    for f in files:
        raw = OmegaConf.merge(raw, _load_yaml(Path(f)))
    for item in overrides:
        raw = _merge_override(raw, item)
    raw = _with_recipe(raw)
    # benchmark/experiment group files hold top-level sections (data:, eval:, ...).
    for group in ("benchmark", "experiment"):
        if group in raw:
            raise ConfigError(
                f"{group!r} is not a config section; use {group}=NAME to merge configs/{group}/NAME.yaml"
            )
    try:
        method = _method_section(raw)
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(_oc_message(e, "method")) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    try:
        rest = OmegaConf.masked_copy(raw, [k for k in raw if k != "method"]) if len(raw) else raw
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, rest)
        obj = OmegaConf.to_object(merged)
        obj.method = OmegaConf.to_object(method)
    except ConfigError:
        raise
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(_oc_message(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if obj.mode == "finetune":
        obj.method = GAConfig(name="ga")  # unused in finetune mode; keeps the type uniform
    _check_finite(obj)
    return obj


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float of every section must be finite (``method.r=-inf``, ``train.epochs=inf``), plus the
    ranges no single schema states: Adam's betas, the seed, the freeze patterns."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, float):
            _check(math.isfinite(value), key, f"must be a finite number, got {value}")
    if prefix == "":
        t = obj.train
        for name in ("b1", "b2"):
            _check(0 <= getattr(t, name) < 1, f"train.{name}", f"must be in [0, 1), got {getattr(t, name)}")
        _check(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
        for pattern in obj.model.freeze:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"model.freeze: {pattern!r} is not a valid regex ({e})") from None


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written beside every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
