"""Hugging Face checkpoints <-> sga_jax models: load, save, convert, tokenizer.

Loading builds the module abstractly (``nnx.eval_shape``: no memory), then streams one tensor at a
time from safetensors (``safe_open``) or GGUF (memory-mapped) into its place — sharded when a mesh is
given — so the model is never held twice in host memory. Each architecture has one name table
(``<arch>.HF_NAMES``: module path -> HF name, transpose). Where HF fuses several of our tensors
into one (Phi-3's ``qkv_proj``, ``gate_up_proj``), ``<arch>.HF_FUSED`` names the fused tensor and
its parts, stacked along HF's first axis in order: split on load, concatenated on save. Pickled
``.bin`` weights are refused: no pickle is ever unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from sga_jax.errors import ModelLoadError
from sga_jax.fsutil import (
    PARTIAL_MARKER,
    check_destination,
    mark_partial,
    regular_file,
    remove_stale_partials,
    write_marker,
)
from sga_jax.models import gguf, resolve
from sga_jax.models import layers as L
from sga_jax.models import lora as lora_lib
from sga_jax.models import sharding as S
from sga_jax.models.gguf_tokenizer import load_gguf_tokenizer
from sga_jax.models.sources import (  # noqa: F401 - TensorSource / FusedSource / template: hf's names for them
    FusedSource,
    SafetensorsSource,
    TensorSource,
    fused_parts,
    safetensors_weight_map,
    template,
)


def read_config(directory: Path) -> dict[str, Any]:
    cfg = directory / "config.json"
    if not cfg.exists():
        raise ModelLoadError(f"no config.json in {directory}")
    regular_file(cfg, "config")
    try:
        hf = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{cfg} must hold a JSON object")
    return hf


def _open(path: str | os.PathLike) -> tuple[dict[str, Any], TensorSource, Path]:
    """(HF config dict, tensor source, resolved path) for an HF dir, a .gguf file or a hub name."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        regular_file(p, "model file")
        if p.suffix.lower() == ".gguf":
            hf, source = gguf.open_gguf(p)
            return hf, source, p
        raise ModelLoadError(f"{p} is a file but not a .gguf file; give an HF directory or a .gguf")
    if p.is_dir():
        hf = read_config(p)
        resolve(hf)  # unknown model_type / remote code: fail before touching the weights
        return hf, SafetensorsSource(safetensors_weight_map(p)), p
    if isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return _open(_hub_download(path))
    raise ModelLoadError(f"model path {p} does not exist")


def _hub_download(repo_id: str) -> Path:
    """Fetch config + safetensors + tokenizer of a hub repo (users with a network; never in tests)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
            )
        )
    except Exception as e:
        raise ModelLoadError(f"{repo_id!r} is not a local path and could not be downloaded: {e}") from None


# ---------------------------------------------------------------------------------- name mapping


def _hf_entry(table: dict[str, tuple[str, bool]], tmpl: str) -> tuple[str, bool]:
    if tmpl not in table:  # a parameter our model has but the table forgot: a bug, say so
        raise ModelLoadError(f"no HF name for module parameter {tmpl}")
    return table[tmpl]


_FLOAT_DTYPES = (
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(ml_dtypes.bfloat16),
)


def _fetch(source: TensorSource, name: str, transpose: bool, shape: tuple, dtype) -> np.ndarray:
    if name not in source.names():
        raise ModelLoadError(f"missing tensor {name!r} in the checkpoint")
    t = source.get(name)
    if np.dtype(t.dtype) not in _FLOAT_DTYPES:  # an integer header on float weights: garbage if cast
        raise ModelLoadError(f"tensor {name!r} is stored as {t.dtype}; model weights must be floating point")
    if transpose:
        t = t.T
    if tuple(t.shape) != tuple(shape):
        want = tuple(shape[::-1]) if transpose else tuple(shape)
        raise ModelLoadError(
            f"tensor {name!r} has shape {tuple(t.T.shape if transpose else t.shape)}, expected {want}"
        )
    return np.asarray(t, dtype=dtype)


def _check_layer_count(config, table: dict[str, tuple[str, bool]], names: set[str], path: Path) -> None:
    """The config's layer count against the layers the checkpoint holds, before anything is built
    (building 10,000 abstract layers would take hours; fewer than stored would drop layers)."""
    layered = [hf_name for tmpl, (hf_name, _) in table.items() if "{i}" in tmpl]
    if not layered:
        return
    pattern = re.compile(re.escape(layered[0]).replace(re.escape("{i}"), r"(\d+)") + "$")
    present = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    stored = max(present) + 1 if present else 0
    if config.num_layers != stored:
        raise ModelLoadError(
            f"{path}: the config asks for {config.num_layers} layers but the checkpoint holds {stored}"
        )


_IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")  # a cached buffer old checkpoints carry


def _check_unused(unused: set[str], config, path: Path) -> None:
    """Tensors the model does not use mean the config does not describe the checkpoint."""
    unused = {n for n in unused if not _IGNORED_TENSORS.match(n)}
    if getattr(config, "tie_word_embeddings", False):
        unused.discard("lm_head.weight")  # tied: the embedding is the head; a stored copy is redundant
    if unused:
        first = sorted(unused)[0]
        raise ModelLoadError(
            f"{path}: the checkpoint holds {len(unused)} tensors this model does not use (e.g. {first!r}); "
            "does config.json describe these weights?"
        )


def _hf_rows(table: dict[str, tuple[str, bool]], state) -> dict[str, int]:
    """HF tensor name -> its first dimension in HF layout, for every parameter of ``state``."""
    rows: dict[str, int] = {}
    for key, var in nnx.to_flat_state(state):
        shape = tuple(var.get_value().shape)
        tmpl, index, stacked = template(key)
        hf_name, transpose = _hf_entry(table, tmpl)
        shape = shape[1:] if stacked else shape
        n = shape[-1] if transpose else shape[0]
        layers = range(var.get_value().shape[0]) if stacked else [index]
        for i in layers:
            rows[hf_name.format(i=i) if i is not None else hf_name] = n
    return rows


def _read_state(state, source: TensorSource, table, pdtype, mesh, model_type: str) -> set[str]:
    """Fill every variable of the abstract ``state`` from ``source`` (host copy in ``pdtype``, then
    placed, sharded when ``mesh``); returns the HF tensor names used."""
    used: set[str] = set()
    for key, var in nnx.to_flat_state(state):
        shape = tuple(var.get_value().shape)
        tmpl, index, stacked = template(key)
        hf_name, transpose = _hf_entry(table, tmpl)
        if stacked:
            host = np.empty(shape, dtype=pdtype)
            for i in range(shape[0]):
                host[i] = _fetch(source, hf_name.format(i=i), transpose, shape[1:], pdtype)
                used.add(hf_name.format(i=i))
        else:
            name = hf_name.format(i=index) if index is not None else hf_name
            host = _fetch(source, name, transpose, shape, pdtype)
            used.add(name)
        if mesh is not None:
            value = jax.device_put(host, S.sharding_for(key, shape, mesh, model_type))
        else:
            value = jax.device_put(host)
        del host
        var.set_value(value)
    return used


def load_model(
    path: str | os.PathLike,
    dtype: Any = "float32",
    *,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    scan_layers: bool = False,
    remat: str | None = None,
    attention: str = "auto",
):
    """Load an HF directory (model.safetensors or a sharded index), a ``.gguf`` file, or (with a
    network) a hub repo id into the matching sga_jax model.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype (default: ``dtype``). With a
    ``mesh`` each parameter is placed sharded by ``sharding.PARTITION_RULES`` as it is read.
    ``remat`` / ``attention``: see ``sga_jax.models.layers.remat_policy`` /
    ``sga_jax.models.attention.attention_implementation``.
    Raises ModelLoadError (naming the problem) and returns nothing half-loaded.
    """
    hf, source, resolved = _open(path)
    config, cls = resolve(hf)
    if hasattr(cls, "adapt_source"):  # Gemma 3 multimodal checkpoints: the text part's tensors
        source = cls.adapt_source(source)
    pdtype = L.as_dtype(param_dtype if param_dtype is not None else dtype)
    with source:
        _check_layer_count(config, cls.HF_NAMES, source.names(), resolved)
        abstract = nnx.eval_shape(
            lambda: cls(
                config,
                rngs=nnx.Rngs(0),
                dtype=dtype,
                param_dtype=pdtype,
                scan_layers=scan_layers,
                remat=remat,
                attention=attention,
            )
        )
        graphdef, state = nnx.split(abstract)
        table = cls.HF_NAMES
        if getattr(cls, "HF_FUSED", None):
            source = FusedSource(source, cls.HF_FUSED, _hf_rows(table, state))
        used = _read_state(state, source, table, pdtype, mesh, config.model_type)
        if isinstance(source, FusedSource):  # a fused tensor is used when its parts are
            used |= {source.parts[n] for n in used if n in source.parts}
        _check_unused(source.names() - used, config, resolved)
    model = nnx.merge(graphdef, state)
    config.hf["_name_or_path"] = str(resolved)
    return model


# ------------------------------------------------------------------------------------------- save

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}


def hf_tensors(model) -> Iterator[tuple[str, Any, bool, int | None]]:
    """Yield ``(hf_name, array, transpose, layer_index_or_None)`` for every parameter of ``model``
    (stacked layer params yield once per layer). LoRA adapters are merged into their base kernel
    (``W + (alpha/r) · A B``, :func:`sga_jax.models.lora.merged_kernel`), never written apart."""
    table = type(model).HF_NAMES
    merged = {(*path, "kernel"): lin for path, lin in lora_lib.adapters(model).items()}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, lora_lib.LoRAParam):
            continue
        value = lora_lib.merged_kernel(merged[key]) if key in merged else var.get_value()
        tmpl, index, stacked = template(key)
        hf_name, transpose = _hf_entry(table, tmpl)
        if stacked:
            for i in range(value.shape[0]):
                yield hf_name.format(i=i), value, transpose, i
        else:
            yield (hf_name.format(i=index) if index is not None else hf_name), value, transpose, None


def _write_safetensors(model, file: Path) -> None:
    """Stream every tensor into one safetensors file (header first, then one tensor at a time)."""
    tensors = {name: (value, transpose, i) for name, value, transpose, i in hf_tensors(model)}
    fused = fused_parts(getattr(type(model), "HF_FUSED", None) or {}, tensors)
    entries = []
    offset = 0
    for name, (value, _, _) in tensors.items():
        # a part of a fused HF tensor: write the fused one, in place of its first part
        out_name, members = fused.get(name, (name, [name]))
        if name != members[0]:
            continue
        shapes = []
        for member in members:
            v, transpose, i = tensors[member]
            shape = v.shape[1:] if i is not None else v.shape
            shapes.append(tuple(int(s) for s in (shape[::-1] if transpose else shape)))
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        dt = np.dtype(value.dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        entries.append((out_name, [tensors[m] for m in members], dt, shape, offset, nbytes))
        offset += nbytes
    header = {
        name: {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        for name, _, dt, shape, off, n in entries
    }
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align tensor data to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, parts, dt, _, _, _ in entries:
            for value, transpose, i in parts:  # a fused tensor's parts, stacked along its rows
                arr = np.asarray(jax.device_get(value[i] if i is not None else value))
                if transpose:
                    arr = arr.T
                f.write(np.ascontiguousarray(arr, dtype=dt).tobytes())


def export_config(model) -> dict[str, Any]:
    """The HF config.json of ``model`` (its source config, GGUF quantisation info stripped)."""
    hf = {k: v for k, v in model.config.hf.items() if k not in ("quantization_config", "_name_or_path")}
    dtype = str(np.dtype(next(hf_tensors(model))[1].dtype))  # the base weights' (never an adapter's)
    hf["torch_dtype"] = dtype
    hf["dtype"] = dtype
    hf.setdefault("architectures", [type(model).__name__])
    if not hf.get("architectures"):
        hf["architectures"] = [type(model).__name__]
    return hf


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# What an HF directory written by save_model needs for load_model + load_tokenizer to work.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def has_tokenizer(source: Path) -> bool:
    """Whether ``source`` (a .gguf file or an HF directory) carries a tokenizer."""
    if source.is_file():
        return source.suffix.lower() == ".gguf"
    return any((source / f).is_file() for f in _TOKENIZER_FILES)


def missing_files(directory: Path) -> list[str]:
    """The files of :data:`REQUIRED_FILES` that ``directory`` lacks (all of them if it is absent)."""
    return [f for f in REQUIRED_FILES if not (directory / f).is_file()]


def _replaceable(out: Path, model, overwrite: bool) -> Path:
    """The export's destination check: never replace the user's folder or the model's own source."""
    return check_destination(out, sources=(model.config.hf.get("_name_or_path"),), overwrite=overwrite)


def save_model(
    model,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    lora: str = "merged",
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer when known) to ``out_dir``, via
    a temporary directory renamed into place, so ``out_dir`` is complete or absent.
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads the result and gives the same logits.
    An existing ``out_dir`` is replaced only when it is empty, a previous export (marker file) or
    ``overwrite``; never when it holds the model's source.

    Without ``tokenizer``, the one beside the model's source (a GGUF's metadata, an HF directory's
    tokenizer files) is copied; a source that has one that cannot be loaded is an error, not a
    silently tokenizer-less output. A source without any tokenizer gives weights and config only.

    A model with LoRA adapters (:mod:`sga_jax.models.lora`): ``lora="merged"`` writes the merged
    weights ``W + (alpha/r) · A B``; ``"adapter"`` writes only PEFT's ``adapter_config.json`` +
    ``adapter_model.safetensors`` (+ the tokenizer); ``"both"`` the merged checkpoint with the PEFT
    adapter in its ``adapter/`` subfolder."""
    if lora not in ("merged", "adapter", "both"):
        raise ValueError(f"lora must be merged, adapter or both, got {lora!r}")
    out = _replaceable(Path(out_dir).expanduser(), model, overwrite)
    peft = lora_lib.peft_files(model) if lora != "merged" else None  # refuses before writing
    if tokenizer is None:
        source = model.config.hf.get("_name_or_path")
        if source and has_tokenizer(Path(source)):
            tokenizer = load_tokenizer(source)  # raises ModelLoadError naming the problem
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)  # what an export killed earlier left beside out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an export is an ordinary folder
    try:
        mark_partial(tmp)
        if lora != "adapter":
            (tmp / "config.json").write_text(json.dumps(export_config(model), indent=2, sort_keys=True))
            _write_safetensors(model, tmp / "model.safetensors")
        if peft is not None:
            lora_lib.write_peft(peft, tmp if lora == "adapter" else tmp / "adapter")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_marker(tmp)  # lists the files written: only those may be replaced by a later export
        (tmp / PARTIAL_MARKER).unlink()
        if out.exists():
            _replaceable(out, model, overwrite)
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:  # a full disk: name the file the user asked for, not our temporary one
        shutil.rmtree(tmp, ignore_errors=True)
        raise _named_os_error(e, tmp, out, model) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _named_os_error(e: OSError, tmp: Path, out: Path, model) -> OSError:
    """``e`` re-addressed to the destination's file (a bare ``write`` error names no file), with the
    export's size when the disk is full."""
    name = Path(e.filename) if e.filename else tmp / "model.safetensors"
    try:
        name = out / name.relative_to(tmp)
    except ValueError:
        pass
    cause = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        need = sum(
            int(np.prod(v.shape[1:] if i is not None else v.shape)) * np.dtype(v.dtype).itemsize
            for _, v, _, i in hf_tensors(model)
        )
        cause += f" (the export needs {need / 2**20:.1f} MiB)"
    return OSError(e.errno, cause, str(name))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------- tokenizer etc.


def load_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer of an HF directory or of a ``.gguf`` file (built from the GGUF
    metadata without torch: :mod:`sga_jax.models.gguf_tokenizer`)."""
    import transformers

    p = Path(path).expanduser()
    try:
        if p.is_file() and p.suffix.lower() == ".gguf":
            return load_gguf_tokenizer(p)
        return transformers.AutoTokenizer.from_pretrained(str(p))
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {p}: {' '.join(str(e).split())}") from None


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, *, overwrite: bool = False
) -> Path:
    """A GGUF file or HF directory -> an HF safetensors directory (weights, config, tokenizer).
    ``dst`` must be new, empty or a previous export unless ``overwrite``; never the source's folder."""
    src_p = Path(src).expanduser()
    check_destination(dst, sources=(src_p,), overwrite=overwrite)
    hf, source, _ = _open(src)
    source.close()
    if dtype is None:
        dtype = (
            "float32"
            if src_p.suffix.lower() == ".gguf"
            else hf.get("torch_dtype") or hf.get("dtype") or "float32"
        )
    model = load_model(src, dtype=dtype)
    return save_model(model, dst, overwrite=overwrite)
