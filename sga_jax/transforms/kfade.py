"""K-FADE as an optax transform: forget gradients -> preconditioned uphill Gauss-Newton steps.

K-FADE (McKinney et al. 2026, "Gauss-Newton Unlearning for the LLM Era", arXiv 2602.10568) moves
the weights *up* the forget objective along ``(F_retain + λI)⁻¹ ∇L_forget``, where ``F_retain`` is
the K-FAC (or EK-FAC) Gauss-Newton matrix of the retain set: directions the retain outputs are
sensitive to are damped, so the forget set is suppressed while the retain outputs move little. The
step length comes from a trust region on the retain outputs (a KL budget δ per *attended* retain
token: the curvature's A and G are averaged over every non-padding token, prompt included)::

    Δθ = η (F + λI)⁻¹ g,    η = min(η_max, √(2δ / gᵀ(F + λI)⁻¹g))    ⇒ ½ Δθᵀ(F + λI)Δθ ≤ δ

The transform emits the final update (``optax.apply_updates(params, updates)`` takes the step), so
it goes last in an ``optax.chain`` (after e.g. a gradient transform such as ``gru``) and needs no
learning rate. The curvature is computed once with ``sga_jax.curvature.estimate_curvature`` and given
either to the factory (kept in the state) or to each update as the extra argument ``curvature``
(kfac-jax's ``precond_state``: the estimator stays outside the transform)::

    tx = kfade(damping=1e-3, trust_region=1e-2)
    updates, state = tx.update(grads, state, params, curvature=estimate_curvature(model, retain))

Layers: this module imports only :mod:`sga_jax.kfac_math` (the algebra), never the estimator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sga_jax.errors import ConfigError
from sga_jax.kfac_math import UNTAPPED, KronEigen, precondition, trust_region_step_size


class KFADEState(NamedTuple):
    """``eigen``: per layer key the factors' eigenbases (``KronEigen``) given to the factory (empty
    when the curvature comes with each update); ``count``: steps taken;
    ``last_step_size``: η of the latest step (for logging)."""

    eigen: dict[str, KronEigen]
    count: jax.Array
    last_step_size: jax.Array


def kfade(
    curvature: Mapping[str, KronEigen] | None = None,
    *,
    damping: float = 1e-3,
    trust_region: float = 1e-2,
    max_step_size: float | None = None,
    ascend: bool = True,
    untapped: str = "freeze",
) -> optax.GradientTransformationExtraArgs:
    """Turn gradients of the forget objective into K-FADE updates.

    Args:
      curvature: layer key -> ``KronEigen`` (``sga_jax.curvature.estimate_curvature``), kept in
        the state; or None, and each ``update`` receives it as the extra argument ``curvature``.
      damping: λ added to the Kronecker eigenvalues.
      trust_region: δ, the retain-output budget ``½ Δθᵀ(F + λI)Δθ`` of one step.
      max_step_size: η_max (``None``: no cap).
      ascend: ``True`` when the incoming gradients are of an objective to *increase* (forget NLL,
        the default); ``False`` when they are of a loss to *minimise* (e.g. ``-NLL`` or any
        ``sga_jax.objectives`` loss), whose negative is then ascended.
      untapped: parameters without curvature: ``"freeze"`` (not moved) or ``"identity"`` (``g/λ``).
    """
    if not damping > 0:
        raise ConfigError(f"kfade damping must be > 0, got {damping}")
    if not trust_region > 0:
        raise ConfigError(f"kfade trust_region must be > 0, got {trust_region}")
    if max_step_size is not None and not max_step_size > 0:
        raise ConfigError(f"kfade max_step_size must be > 0 or None, got {max_step_size}")
    if untapped not in UNTAPPED:
        raise ConfigError(f"unknown untapped={untapped!r}; use one of {', '.join(UNTAPPED)}")
    eigen = dict(curvature or {})
    sign = 1.0 if ascend else -1.0

    def init_fn(params: Any) -> KFADEState:
        del params
        return KFADEState(
            eigen=eigen, count=jnp.zeros((), jnp.int32), last_step_size=jnp.zeros((), jnp.float32)
        )

    def update_fn(
        updates: Any,
        state: KFADEState,
        params: Any = None,
        *,
        curvature: Mapping[str, KronEigen] | None = None,
        **extra_args: Any,
    ):
        del params, extra_args
        eig = state.eigen if curvature is None else curvature
        if not eig:
            raise ConfigError("kfade: no curvature (give it to kfade(...) or to update(..., curvature=...))")
        direction, quad = precondition(eig, updates, damping, untapped=untapped)
        eta = trust_region_step_size(quad, trust_region, max_step_size)
        new_updates = jax.tree.map(lambda d: (sign * eta).astype(d.dtype) * d, direction)
        return new_updates, KFADEState(
            eigen=state.eigen, count=optax.safe_int32_increment(state.count), last_step_size=eta
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["KFADEState", "kfade"]
