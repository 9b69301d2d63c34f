"""Named HF tensors from files: the sources both loaders (:mod:`sga_jax.models.hf`,
:mod:`sga_jax.models.gguf`) build on, so neither imports the other for them.

``SafetensorsSource`` reads an HF directory's safetensors files (one file or shards with an index,
whose shard names must stay inside the directory); ``FusedSource`` serves the parts of fused HF
tensors (Phi-3's ``qkv_proj``) under their unfused names. Pickled weights are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from sga_jax.errors import ModelLoadError
from sga_jax.fsutil import regular_file

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


# --------------------------------------------------------------------------------- tensor sources


def template(path: tuple) -> tuple[str, int | None, bool]:
    """Flat-state path -> (name template with ``{i}``, layer index, stacked?)."""
    keys = list(path)
    if keys and keys[0] == "layers":
        if len(keys) > 1 and isinstance(keys[1], int):
            return ".".join(["layers", "{i}", *map(str, keys[2:])]), keys[1], False
        return ".".join(["layers", "{i}", *map(str, keys[1:])]), None, True
    return ".".join(map(str, keys)), None, False


class TensorSource:
    """Random access to named HF tensors (numpy, HF layout) from one or more files."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsSource(TensorSource):
    """Safetensors files of an HF directory (single file or sharded with an index)."""

    def __init__(self, weight_map: dict[str, Path]):
        self.weight_map = weight_map
        self._handles: dict[Path, Any] = {}

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except Exception as e:  # SafetensorError, OSError: truncated / corrupt header
                raise ModelLoadError(f"cannot read safetensors file {file}: {e}") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> np.ndarray:
        file = self.weight_map[name]
        try:
            return self._handle(file).get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {e}") from None

    def close(self) -> None:
        self._handles.clear()


def _template_regex(tmpl: str) -> re.Pattern:
    return re.compile(re.escape(tmpl).replace(r"\{i\}", r"(\d+)"))


def fused_parts(fused: dict[str, tuple[str, ...]], names) -> dict[str, tuple[str, list[str]]]:
    """Each name of ``names`` that is a part of a fused tensor -> (fused name, its part names in order)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for fused_tmpl, parts in fused.items():
        regexes = [_template_regex(p) for p in parts]
        for name in names:
            for rx in regexes:
                m = rx.fullmatch(name)
                if m:
                    fmt = {"i": m.group(1)} if m.groups() else {}
                    out[name] = (fused_tmpl.format(**fmt), [p.format(**fmt) for p in parts])
    return out


class FusedSource(TensorSource):
    """``source`` with each fused tensor also readable as its parts: part k is HF rows
    ``[sum(rows[:k]), sum(rows[:k + 1]))`` of the fused tensor, ``rows`` the parts' first dims."""

    def __init__(self, source: TensorSource, fused: dict[str, tuple[str, ...]], rows: dict[str, int]):
        self.source = source
        self.rows = rows  # part name -> rows of the part in HF layout
        wanted = fused_parts(fused, rows)
        self.parts = {p: f for p, (f, _) in wanted.items() if f in source.names()}
        self.members = {f: ps for _, (f, ps) in wanted.items()}
        self._last: tuple[str, np.ndarray] | None = None  # the last fused tensor read (3 parts each)

    def names(self) -> set[str]:
        return self.source.names() | set(self.parts)

    def get(self, name: str) -> np.ndarray:
        if name not in self.parts:
            return self.source.get(name)
        fused = self.parts[name]
        if self._last is None or self._last[0] != fused:
            self._last = (fused, self.source.get(fused))
        t = self._last[1]
        sizes = [self.rows[p] for p in self.members[fused]]
        if t.shape[0] != sum(sizes):
            raise ModelLoadError(
                f"tensor {fused!r} has {t.shape[0]} rows, expected {sum(sizes)} (its parts: {sizes})"
            )
        k = self.members[fused].index(name)
        return t[sum(sizes[:k]) : sum(sizes[: k + 1])]

    def close(self) -> None:
        self._last = None
        self.source.close()


def safetensors_weight_map(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return _index_weight_map(directory, index)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{directory} holds only pickled PyTorch weights ({', '.join(pickles)}); sga_jax "
                "never unpickles files (arbitrary code execution). Convert them to safetensors "
                "first, in an environment you trust (transformers: save_pretrained(..., "
                "safe_serialization=True))"
            )
        raise ModelLoadError(f"no model.safetensors (or safetensors index) in {directory}")
    weight_map: dict[str, Path] = {}
    for f in files:
        regular_file(f, "safetensors file")  # a FIFO would block safe_open forever
        try:
            with safe_open(str(f), framework="numpy") as h:
                for name in h.keys():
                    weight_map[name] = f
        except Exception as e:
            raise ModelLoadError(f"cannot read safetensors file {f}: {e}") from None
    return weight_map


def _index_weight_map(directory: Path, index: Path) -> dict[str, Path]:
    """The weight map of a sharded checkpoint's index. Shard names must be plain file names of
    regular files inside ``directory``: an absolute or ``../`` name would read outside the model."""
    regular_file(index, "safetensors index")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelLoadError(f"{index}: weight_map must map tensor names to shard file names (strings)")
    root = directory.resolve()
    for f in sorted(set(weight_map.values())):
        if not f or Path(f).name != f or f in (".", ".."):
            raise ModelLoadError(f"{index} names shard {f!r}: only plain file names inside {directory}")
        if not (directory / f).exists():
            raise ModelLoadError(f"{index} names a shard file that is missing: {f}")
        if (directory / f).resolve().parent != root:
            raise ModelLoadError(f"{index} names shard {f!r}, which resolves outside {directory}")
        regular_file(directory / f, "safetensors shard")
    return {name: directory / f for name, f in weight_map.items()}
