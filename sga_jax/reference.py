"""What a method's loss may see besides its batch: the frozen starting model, and which parameter
entries it trains (the method seam, docs/design.md "Adding a method").

**The reference model** (``method.needs`` has ``reference``): held once, as an argument of the
jitted step (never a closure constant, never donated, never copied per step). The frozen part of
the model (``rest`` of :func:`sga_jax.train.split_model`) is shared with the trained model, so the
reference costs one copy of the *trainable* parameters only, on their sharding, optionally in a
lower dtype (``method.ref_dtype``). With LoRA the trainable parameters are the adapters: the
reference is the base with the adapters switched off (zero adapter weights made inside the step),
so no copy of any weight exists. In the step, ``reference_model(graphdef, params, ref, rest)``
rebuilds it and the loss receives it as ``ref``.

**Parameter selection** (``method.trainable``, RMU's open-unlearning ``trainable_params_regex``):
regexes fully matched on HF parameter names (``model.layers.5.mlp.down_proj.weight``). A scanned
model stacks its layers' weights ``[L, ...]`` under one name without an index: its mask runs over
the stacked axis (``[L, 1, ...]``), so "train layers 5-7 only" means the same scanned and
unrolled. The mask multiplies the final updates (after Adam and weight decay), as open-unlearning's
RMU does it: its optimizer holds only the selected parameters (rmu.py l. 43-48) while every
parameter keeps ``requires_grad`` (l. 48), so the gradient clipping norm counts all gradients.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models.layers import as_dtype
from sga_jax.models.sources import template


def reference_params(params, *, lora: bool, dtype: str | None = None):
    """The reference's copy of the trainable parameters at the start (``None`` with LoRA: the
    adapters are switched off in the step, no copy). Taken before the first step donates
    ``params``; ``dtype`` casts the copy (``method.ref_dtype``)."""
    if lora:
        return None
    cast = as_dtype(dtype) if dtype is not None else None

    def copy(x):
        if isinstance(x, jax.ShapeDtypeStruct):  # abstract parameters (sga-jax plan): an abstract copy
            return jax.ShapeDtypeStruct(x.shape, cast or x.dtype, sharding=x.sharding)
        return jnp.array(x, dtype=cast or x.dtype, copy=True)

    return jax.tree.map(copy, params)


def reference_model(graphdef, params, ref, rest):
    """The frozen reference model inside a step: the trainable parameters replaced by ``ref`` (or,
    ``ref is None``, by zeros: LoRA adapters off) on the shared frozen ``rest``. Gradients never
    flow into it (``stop_gradient``)."""
    if ref is None:
        ref = jax.tree.map(jnp.zeros_like, params)
    else:  # cast back to the trained parameters' dtypes (a no-op unless ref_dtype is set)
        ref = jax.tree.map(lambda r, p: r.astype(p.dtype), ref, params)
    return nnx.merge(graphdef, jax.lax.stop_gradient(ref), rest)


def _keys(path) -> tuple:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
    return tuple(out)


def _leaf_mask(model, keys: tuple, shape: tuple, patterns: list[re.Pattern], num_layers: int):
    """The mask of one parameter: a Python bool, or ``[L, 1, ...]`` for a stacked (scanned) one."""
    tmpl, index, stacked = template(keys)
    entry = type(model).HF_NAMES.get(tmpl)
    if entry is None:
        raise ConfigError(f"method.trainable: no HF name for parameter {tmpl}")
    name = entry[0]

    def hit(i: int | None) -> bool:
        full = name if i is None else name.replace("{i}", str(i))
        return any(p.fullmatch(full) for p in patterns)

    if not stacked:
        return hit(index)
    per_layer = np.array([hit(i) for i in range(num_layers)], np.float32)
    return per_layer.reshape((num_layers,) + (1,) * (len(shape) - 1))


def trainable_mask(model, params, patterns: Sequence[str]):
    """A mask pytree over ``params`` (1 = trained, 0 = frozen; scalars, or ``[L, 1, ...]`` over the
    stacked axis of scanned layers) from regexes fully matched on HF parameter names; ``None``
    when every entry trains. Raises ConfigError when nothing matches."""
    regexes = [re.compile(p) for p in patterns]
    n = int(model.config.num_layers)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    masks = [_leaf_mask(model, _keys(path), x.shape, regexes, n) for path, x in leaves]
    if not any(np.any(m) for m in masks):
        raise ConfigError(f"method.trainable={list(patterns)} matches no parameter that trains")
    if all(np.all(m) for m in masks):
        return None
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(m, np.float32) for m in masks])


def masked(mask) -> optax.GradientTransformation:
    """Multiplies the incoming updates by ``mask`` (a pytree of broadcastable 0/1 arrays)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mask), state

    return optax.GradientTransformation(init_fn, update_fn)


def with_mask(tx_parts: list[Any], mask) -> list[Any]:
    """``[*tx_parts, masked(mask)]`` (``tx_parts`` unchanged without a mask)."""
    return tx_parts if mask is None else [*tx_parts, masked(mask)]


__all__ = ["masked", "reference_model", "reference_params", "trainable_mask", "with_mask"]
