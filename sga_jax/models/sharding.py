"""Device mesh and parameter partition rules (jit with shardings; no pmap).

Mesh axes: ``data`` (pure data parallel: parameters replicated), ``fsdp`` (data parallel with
parameters sharded along their model dimension, ZeRO-3 style) and ``tensor`` (Megatron tensor
parallelism, Shoeybi et al. 2019, arXiv 1909.08053: column-parallel q/k/v/up/gate/fc1, row-parallel
o/down/fc2). Batches are sharded over ``("data", "fsdp")``.

A rule is ``(regex on the module path "layers/self_attn/q_proj/kernel", PartitionSpec)``; the first
match wins. Axes that do not divide a dimension are dropped for that tensor (tiny models stay legal),
and a scanned layer stack gets an unsharded leading layer axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sga_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

_COMMON: list[tuple[str, P]] = [
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1)/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1)/bias$", P("tensor")),
    (r"(o_proj|down_proj|fc2)/kernel$", P("tensor", "fsdp")),
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"embed_positions/embedding$", P(None, "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"lm_head/bias$", P("tensor")),
    (r"project_(in|out)/kernel$", P("fsdp", None)),
    (r".*", P()),  # norms, output biases: small, replicated
]

PARTITION_RULES: dict[str, list[tuple[str, P]]] = {
    "gemma": _COMMON,
    "gemma2": _COMMON,
    "gemma3_text": _COMMON,
    "llama": _COMMON,
    "mistral": _COMMON,
    "opt": _COMMON,
    "phi": _COMMON,
    "phi3": _COMMON,  # q/k/v and gate/up are separate modules here (fused only in HF files)
    "qwen2": _COMMON,
    "qwen3": _COMMON,
}


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor"); one size may be -1 (all remaining devices)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"{len(devices)} devices cannot be split into data/fsdp/tensor = {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} "
            f"devices, {len(devices)} available"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(grid, AXES, axis_types=axis_types)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the dimension they would split."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[n] for n in names)
        out.append(axes if size > 1 and dim % size == 0 else None)
    return P(*out)


def spec_for(path: tuple, shape: tuple[int, ...], mesh: Mesh, model_type: str) -> P:
    """PartitionSpec of the parameter at ``path`` (a flat-state path) with ``shape``."""
    keys = [str(k) for k in path]
    stacked = bool(path) and path[0] == "layers" and len(path) > 1 and not isinstance(path[1], int)
    name = "/".join(keys)
    spec = next(s for pattern, s in PARTITION_RULES.get(model_type, _COMMON) if re.search(pattern, name))
    if stacked:
        return P(None, *_fit(spec, shape[1:], mesh))
    return _fit(spec, shape, mesh)


def sharding_for(path: tuple, shape: tuple[int, ...], mesh: Mesh, model_type: str) -> NamedSharding:
    return NamedSharding(mesh, spec_for(path, shape, mesh, model_type))


def model_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """The NamedSharding of every parameter of ``model`` (same tree as ``nnx.state(model)``)."""
    state = nnx.state(model)
    model_type = model.config.model_type
    flat = [
        (path, sharding_for(path, var.get_value().shape, mesh, model_type))
        for path, var in nnx.to_flat_state(state)
    ]
    return nnx.from_flat_state(flat)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place ``model``'s parameters sharded on ``mesh`` (in place); returns the model."""
    state = nnx.state(model)
    shardings = model_shardings(model, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[B, T]`` batch: rows split over data × fsdp."""
    return NamedSharding(mesh, P(BATCH))
