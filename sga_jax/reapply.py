"""Save an unlearning update Δθ and re-apply it to a later (e.g. fine-tuned) model.

K-FADE (arXiv 2602.10568) reports that its unlearning can be re-applied cheaply after the model has
been trained further. That adding the *identical* saved Δθ is how to do so is our inference from
the paper's abstract, not a procedure we found specified there. ``save_delta`` writes Δθ as
safetensors under the model's *Hugging Face* tensor names and layout (``[out, in]`` kernels), so a
delta is independent of our module layout (scanned or unrolled layers) and can be added to any HF
checkpoint of the same architecture; parameters that did not move (all-zero deltas) are left out.
``reapply(delta_path, model_dir, out_dir)`` loads a model, adds the delta and saves an HF directory.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sga_jax.errors import ModelLoadError
from sga_jax.fsutil import check_destination, ordinary_file_mode
from sga_jax.models import hf

FORMAT = "sga_jax.delta/1"


def _hf_names(model: nnx.Module, path: tuple) -> tuple[list[str], bool, bool]:
    """HF tensor names of the parameter at ``path`` (one per layer when stacked), transpose, stacked."""
    tmpl, index, stacked = hf.template(path)
    table = type(model).HF_NAMES
    if tmpl not in table:
        raise ModelLoadError(f"no HF name for module parameter {tmpl}")
    name, transpose = table[tmpl]
    if stacked:
        return [name.format(i=i) for i in range(model.config.num_layers)], transpose, True
    return [name.format(i=index) if index is not None else name], transpose, False


def delta_tensors(delta: nnx.State, model: nnx.Module) -> dict[str, np.ndarray]:
    """``delta`` (an ``nnx.State`` of params like ``nnx.state(model, nnx.Param)``) -> HF-named
    float32 arrays in HF layout; all-zero tensors are dropped."""
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(delta):
        value = np.asarray(jax.device_get(var.get_value() if hasattr(var, "get_value") else var), np.float32)
        names, transpose, stacked = _hf_names(model, path)
        parts = list(value) if stacked else [value]
        for name, part in zip(names, parts, strict=True):
            if not np.any(part):
                continue
            out[name] = np.ascontiguousarray(part.T if transpose else part)
    return out


def save_delta(
    delta: nnx.State,
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write Δθ to ``path`` (safetensors; temporary file renamed into place)."""
    tensors = delta_tensors(delta, model)
    meta = {
        "format": FORMAT,
        "model_type": str(model.config.model_type),
        "extra": json.dumps(metadata or {}, sort_keys=True, default=str),
    }
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        ordinary_file_mode(tmp)  # mkstemp / safetensors make 0600: the user's umask instead
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def load_delta(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(HF-named tensors, metadata)`` of a delta written by :func:`save_delta`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"delta file {p} does not exist")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ModelLoadError(f"cannot read delta file {p}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelLoadError(
            f"{p} is not an sga_jax delta (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        meta["extra"] = json.loads(meta.get("extra") or "{}")
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{p}: the delta's metadata 'extra' is not JSON: {e}") from None
    for name, t in tensors.items():  # an integer or NaN delta would write a broken model
        if t.dtype.kind != "f" and str(t.dtype) != "bfloat16":
            raise ModelLoadError(f"{p}: delta tensor {name!r} is {t.dtype}; a delta must be floating point")
        if not np.isfinite(np.asarray(t, np.float32)).all():
            raise ModelLoadError(f"{p}: delta tensor {name!r} holds NaN or inf")
    return tensors, meta


def apply_delta(model: nnx.Module, tensors: dict[str, np.ndarray], *, scale: float = 1.0) -> nnx.Module:
    """Add ``scale ×`` the HF-named ``tensors`` to ``model``'s parameters in place; returns it.
    Every delta tensor must match a parameter of the same shape (ModelLoadError otherwise)."""
    used: set[str] = set()
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        value = var.get_value()
        names, transpose, stacked = _hf_names(model, path)
        if not any(n in tensors for n in names):
            continue
        host = np.array(jax.device_get(value), dtype=np.float32)
        parts = range(len(names)) if stacked else [None]
        for name, i in zip(names, parts, strict=True):
            if name not in tensors:
                continue
            d = tensors[name].T if transpose else tensors[name]
            target_shape = host.shape[1:] if i is not None else host.shape
            if tuple(d.shape) != tuple(target_shape):
                raise ModelLoadError(
                    f"delta tensor {name!r} has shape {tuple(tensors[name].shape)}, the model's is "
                    f"{tuple(target_shape[::-1]) if transpose else tuple(target_shape)}"
                )
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
                if i is None:
                    host = host + scale * d
                else:
                    host[i] = host[i] + scale * d
            used.add(name)
        new = host.astype(value.dtype)
        if not np.isfinite(new.astype(np.float32)).all():  # the sum overflowed: never write an inf model
            raise ModelLoadError(
                f"applying the delta with scale {scale:g} gives NaN or inf in {names[0]!r} (beyond "
                f"{np.dtype(value.dtype).name}'s range); use a smaller --scale"
            )
        var.set_value(jax.device_put(new, getattr(value, "sharding", None)))
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ModelLoadError(
            f"the delta has {len(unknown)} tensors the model lacks (e.g. {unknown[0]!r}): wrong architecture?"
        )
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def reapply(
    delta_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    scale: float = 1.0,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Load ``model_dir`` (HF dir or .gguf), add the delta at ``delta_path`` and save an HF
    directory to ``out_dir`` (temporary directory renamed into place). Returns ``out_dir``.
    ``out_dir`` must be new, empty or a previous export unless ``overwrite``; never the model's folder."""
    if not math.isfinite(scale):
        raise ModelLoadError(f"reapply: --scale must be a finite number, got {scale}")
    check_destination(out_dir, sources=(model_dir, delta_path), overwrite=overwrite)
    tensors, meta = load_delta(delta_path)
    model = hf.load_model(model_dir, dtype=dtype)
    if meta.get("model_type") and meta["model_type"] != model.config.model_type:
        raise ModelLoadError(
            f"the delta is for a {meta['model_type']} model, {model_dir} is {model.config.model_type}"
        )
    apply_delta(model, tensors, scale=scale)
    return hf.save_model(model, out_dir, overwrite=overwrite)


__all__ = ["apply_delta", "delta_tensors", "load_delta", "reapply", "save_delta"]
