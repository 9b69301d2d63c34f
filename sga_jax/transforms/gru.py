"""Gradient Rectified Unlearning as an optax transform (Wang et al. 2025, arXiv 2503.09117).

GRU keeps the unlearning update from fighting retention: with g_u the unlearning direction
(whatever base objective produced it: GA, NPO, SGA, ...) and g_r an exponential moving average of
retain-set gradients,

    g_r ← m·g_r,now + (1 - m)·g_r,prev     (m = 0.8, g_r,prev = 0 before the first step)
    g_u ← g_u - ⟨g_u, g_r⟩/‖g_r‖²·g_r   if ⟨g_u, g_r⟩ < 0

i.e. the component of g_u that would increase the retain loss (for a descent direction g_u,
⟨g_u, g_r⟩ < 0 means stepping along -g_u raises the retain loss) is projected away. Inner products
are over all parameters.

Follows the official code (tmlr-group/GRU, ``dataloader_faster_refactor1.py``): the EMA starts at
0 (l. 178 ``flattened_memory_old = 0.0``), so step 1 uses ``m·g_r,1`` and step t
``m·g_r,t + (1 - m)·ema`` (l. 516-517); the projection applies only when the inner product is
negative (``pipeline``, l. 438-451, ``orthogonal_component_precise``). The official runs do not
clip gradients (``configs/forget_llama.yaml`` l. 6 ``gradient_norm: false`` →
``TrainingArguments(max_grad_norm=False)`` in ``forget_auto_tofu.py`` l. 155), so neither do our
GRU configs (``train.max_grad_norm: null``) and ``clip`` defaults to None.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sga_jax.errors import ConfigError


class GRUState(NamedTuple):
    """State of :func:`gru`: step count, the EMA of retain gradients, and whether the last step
    was rectified (for logging)."""

    count: chex.Array  # int32 scalar
    retain_ema: Any  # pytree like the params
    rectified: chex.Array  # bool scalar


def _vdot(a: Any, b: Any) -> jax.Array:
    """⟨a, b⟩ over all leaves, accumulated in float32 (bf16 parameters included)."""
    f32 = optax.tree_utils.tree_cast
    return jnp.asarray(optax.tree_utils.tree_vdot(f32(a, jnp.float32), f32(b, jnp.float32)), jnp.float32)


def gru(
    m: float = 0.8, *, clip: float | None = None, eps: float = 1e-30
) -> optax.GradientTransformationExtraArgs:
    """Rectify the incoming update against an EMA of retain gradients.

    ``updates`` is the unlearning direction g_u (a descent direction, e.g. the gradient of the
    unlearning loss). The keyword-only extra arg ``retain_grads`` is the gradient of the retain
    loss (mean retain NLL) at the current parameters. The EMA starts at 0, as the official code's
    ``flattened_memory_old = 0.0``: every step, the first included,
    ``g_r ← m·retain_grads + (1 - m)·g_r`` (so step 1 projects against ``m·retain_grads``).

    Args:
      m: weight of the current retain gradient in the EMA, in ``(0, 1]``.
      clip: optional maximum global norm of the rectified update (applied after the projection).
      eps: ``‖g_r‖²`` below this disables the projection (no retain signal yet).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`GRUState`. Extra args other
      than ``retain_grads`` are ignored.
    """
    if not 0.0 < m <= 1.0:
        raise ConfigError(f"GRU momentum m must be in (0, 1], got {m}")
    if clip is not None and clip <= 0:
        raise ConfigError(f"GRU clip must be > 0 or None, got {clip}")

    def init_fn(params):
        return GRUState(
            count=jnp.zeros([], jnp.int32),
            retain_ema=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            rectified=jnp.zeros([], jnp.bool_),
        )

    def update_fn(updates, state, params=None, *, retain_grads=None, **extra_args):
        del params, extra_args
        if retain_grads is None:
            raise ConfigError("gru needs the retain-set gradient as the extra arg retain_grads")
        ema = jax.tree.map(
            lambda now, prev: m * now.astype(jnp.float32) + (1 - m) * prev, retain_grads, state.retain_ema
        )
        dot = _vdot(updates, ema)
        rr = _vdot(ema, ema)
        project = (dot < 0) & (rr > eps)
        coef = jnp.where(project, dot / jnp.where(rr > eps, rr, 1.0), 0.0)
        new = jax.tree.map(lambda g, r_: (g.astype(jnp.float32) - coef * r_).astype(g.dtype), updates, ema)
        if clip is not None:
            norm = jnp.sqrt(_vdot(new, new))
            factor = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
            new = jax.tree.map(lambda g: (g * factor.astype(g.dtype)).astype(g.dtype), new)
        state = GRUState(count=optax.safe_int32_increment(state.count), retain_ema=ema, rectified=project)
        return new, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
