"""Smoothed Gradient Ascent as an optax transform (arXiv 2510.22376).

The SGA loss (:func:`sga_jax.objectives.sga_loss`) of one forget sample and its K-1 normal
samples is ``L = -(1 - r(K-1)/K)·l_f - (r/K)·Σ_i l_i``; its gradient is

    d = ∇L = -g_f - r·u,    u = ḡ_n - (1 - 1/K)·g_f,    ḡ_n = (1/K)·Σ_i g_i,

with g_f = ∇l_f and g_i = ∇l_i. Given g_f and the normal-sample gradient apart, the transform can
also pick, per step, the smoothing rate that minimises the step norm ‖d(r)‖:

    r* = -⟨g_f, u⟩ / ‖u‖²          (inner products over all parameters)

clipped to ``[r_min, r_max]`` (the paper's "optimal smoothing rate"; it trains with a fixed r and
leaves the per-step r* open, so both are offered).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sga_jax.errors import ConfigError


class SGAState(NamedTuple):
    """State of :func:`sga`: the step count and the smoothing rate r used at the last step."""

    count: chex.Array  # int32 scalar
    r: chex.Array  # float32 scalar


def _vdot(a: Any, b: Any) -> jax.Array:
    """⟨a, b⟩ over all leaves, accumulated in float32 (bf16 parameters included)."""
    leaves = jax.tree.leaves(
        jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b)
    )
    return sum(leaves, jnp.float32(0.0))


def sga(
    r: float = -0.8,
    K: int = 4,
    *,
    rate: str | optax.Schedule = "fixed",
    r_min: float = -8.0,
    r_max: float = 1.0,
    eps: float = 1e-30,
) -> optax.GradientTransformationExtraArgs:
    """The SGA descent direction from the forget gradient and the normal-sample gradient.

    ``updates`` must be ``g_f``: the gradient of the **mean forget NLL** ``mean_b l_f`` (the NLL,
    not its negative). The keyword-only extra argument ``normal_grads`` must be the gradient of the
    **mean normal NLL** ``mean_{b,i} l_{b,i}`` over the batch and its K-1 normal samples, i.e.
    ``(1/(K-1))·Σ_i g_i``; internally ``ḡ_n = ((K-1)/K)·normal_grads``. With K = 1 it may be
    omitted (``u = 0``). The output is ``d = -g_f - r·u`` (the gradient of the SGA loss, a
    descent direction to feed to e.g. ``optax.adamw``). With a fixed r it equals
    ``jax.grad(sga_loss)`` exactly.

    Args:
      r: smoothing rate ``<= 1`` (fixed mode; the initial / fallback value otherwise).
      K: 1 forget + K-1 normal samples per forget example (``K >= 1``).
      rate: ``"fixed"``; ``"optimal"`` (per-step r*, clipped to ``[r_min, r_max]``); or an optax
        schedule ``count -> r`` (also clipped to ``[r_min, r_max]``).
      r_min, r_max: clipping range of r (``r_max <= 1``).
      eps: ``‖u‖²`` below this leaves r* at 0 (``u`` vanishes, every r gives the same step).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state :class:`SGAState` holds the r used.
      Extra args other than ``normal_grads`` are ignored, so it composes in ``optax.chain`` with
      transforms that take other extra args (e.g. ``gru``'s ``retain_grads``).
    """
    if int(K) != K or K < 1:
        raise ConfigError(f"SGA K (1 forget + K-1 normal samples) must be an integer >= 1, got {K}")
    if r > 1:
        raise ConfigError(f"SGA smoothing rate r must be <= 1 (arXiv 2510.22376), got r={r}")
    if r_max > 1:
        raise ConfigError(f"SGA r_max must be <= 1, got {r_max}")
    if r_min > r_max:
        raise ConfigError(f"SGA r_min ({r_min}) must be <= r_max ({r_max})")
    if isinstance(rate, str) and rate not in ("fixed", "optimal"):
        raise ConfigError(f"SGA rate must be 'fixed', 'optimal' or an optax schedule, got {rate!r}")
    if not isinstance(rate, str) and not callable(rate):
        raise ConfigError(f"SGA rate must be 'fixed', 'optimal' or an optax schedule, got {rate!r}")
    K = int(K)
    shrink = 1.0 - 1.0 / K

    def init_fn(params):
        del params
        return SGAState(count=jnp.zeros([], jnp.int32), r=jnp.asarray(r, jnp.float32))

    def update_fn(updates, state, params=None, *, normal_grads=None, **extra_args):
        del params, extra_args
        g_f = updates
        if normal_grads is None:
            if K > 1:
                raise ConfigError("sga: K > 1 needs the normal-sample gradient as the extra arg normal_grads")
            u = jax.tree.map(jnp.zeros_like, g_f)
        else:
            scale = (K - 1) / K  # mean over the K-1 normal samples -> (1/K)·Σ_i g_i
            u = jax.tree.map(lambda gn, gf: scale * gn.astype(gf.dtype) - shrink * gf, normal_grads, g_f)

        if rate == "fixed":
            r_t = jnp.asarray(r, jnp.float32)
        elif rate == "optimal":
            uu = _vdot(u, u)
            r_star = -_vdot(g_f, u) / jnp.where(uu > eps, uu, 1.0)
            r_t = jnp.clip(jnp.where(uu > eps, r_star, 0.0), r_min, r_max)
        else:
            r_t = jnp.clip(jnp.asarray(rate(state.count), jnp.float32), r_min, r_max)

        direction = jax.tree.map(lambda gf, uu_: (-gf - r_t.astype(gf.dtype) * uu_).astype(gf.dtype), g_f, u)
        count = optax.safe_int32_increment(state.count)
        return direction, SGAState(count=count, r=r_t)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
