"""K-FADE as an optax transform: forget gradients -> preconditioned uphill Gauss-Newton steps.

K-FADE (McKinney et al. 2026, "Gauss-Newton Unlearning for the LLM Era", arXiv 2602.10568) moves
the weights *up* the forget objective along ``d = (F_retain + Λ)⁻¹ ∇L_forget``, where ``F_retain`` is
the K-FAC (or EK-FAC) Gauss-Newton matrix of the retain set: directions the retain outputs are
sensitive to are damped, so the forget set is suppressed while the retain outputs move little.
``Λ`` is the damping, by default relative to each block's spectrum (``damping_mode="relative"``:
``λ_k = damping · mean eigenvalue of block k``, :func:`sga_jax.kfac_math.block_damping`).

The step length comes from a trust region of δ on the retain outputs::

    Δθ = η d,    η = min(η_max, √(2δ / q)),    ½ η² q = δ

With the extra argument ``quadratic`` (a function ``d -> dᵀGd``: the *exact* Gauss-Newton quadratic
of the retain outputs along ``d``, one ``jax.jvp``; :func:`sga_jax.output_space.gauss_newton_quadratic`)
``q = dᵀGd`` and δ is a KL budget per retain answer token that holds to second order: Martens &
Grosse 2015 (arXiv 1503.05671) §6.4 rescale the K-FAC step by the exact quadratic for the same
reason. Without it ``q = gᵀ(F + Λ)⁻¹g``, K-FAC's own quadratic model: on SmolLM2-135M that model
underestimates the curvature along the step about 7000× (K-FAC misses how the 210 blocks push the
same outputs), so δ then bounds a number far below the real KL (docs/design.md, "K-FADE").

The transform emits the final update (``optax.apply_updates(params, updates)`` takes the step), so
it goes last in an ``optax.chain`` (after e.g. a gradient transform such as ``gru``) and needs no
learning rate. The curvature is computed once with ``sga_jax.curvature.estimate_curvature`` and given
either to the factory (kept in the state) or to each update as the extra argument ``curvature``
(kfac-jax's ``precond_state``: the estimator stays outside the transform)::

    tx = kfade(damping=0.1, trust_region=1e-2)
    gn = lambda d: gauss_newton_quadratic(graphdef, params, rest, d, retain_batch)
    updates, state = tx.update(grads, state, params, curvature=eigen, quadratic=gn)

Layers: this module imports only :mod:`sga_jax.kfac_math` (the algebra), never the estimator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sga_jax.errors import ConfigError
from sga_jax.kfac_math import (
    DAMPING_MODES,
    UNTAPPED,
    KronEigen,
    block_damping,
    precondition,
    trust_region_step_size,
)


class KFADEState(NamedTuple):
    """``eigen``: per layer key the factors' eigenbases (``KronEigen``) given to the factory (empty
    when the curvature comes with each update); ``count``: steps taken;
    ``last_step_size``: η of the latest step; ``last_quadratic``: the q it was sized with (for
    logging: ``½ η² q`` is the step's predicted KL)."""

    eigen: dict[str, KronEigen]
    count: jax.Array
    last_step_size: jax.Array
    last_quadratic: jax.Array


def _check_args(damping, damping_mode, trust_region, max_step_size, untapped) -> None:
    if not damping > 0:
        raise ConfigError(f"kfade damping must be > 0, got {damping}")
    if not trust_region > 0:
        raise ConfigError(f"kfade trust_region must be > 0, got {trust_region}")
    if max_step_size is not None and not max_step_size > 0:
        raise ConfigError(f"kfade max_step_size must be > 0 or None, got {max_step_size}")
    if untapped not in UNTAPPED:
        raise ConfigError(f"unknown untapped={untapped!r}; use one of {', '.join(UNTAPPED)}")
    if damping_mode not in DAMPING_MODES:
        raise ConfigError(f"unknown damping_mode={damping_mode!r}; use one of {', '.join(DAMPING_MODES)}")


def kfade(
    curvature: Mapping[str, KronEigen] | None = None,
    *,
    damping: float = 0.1,
    damping_mode: str = "relative",
    trust_region: float = 1e-2,
    max_step_size: float | None = None,
    ascend: bool = True,
    untapped: str = "freeze",
) -> optax.GradientTransformationExtraArgs:
    """Turn gradients of the forget objective into K-FADE updates.

    Args:
      curvature: layer key -> ``KronEigen`` (``sga_jax.curvature.estimate_curvature``), kept in
        the state; or None, and each ``update`` receives it as the extra argument ``curvature``.
      damping: with ``damping_mode="relative"`` (default) the factor of each block's mean eigenvalue
        (``λ_k = damping · mean(λ_A λ_Gᵀ)``); with ``"absolute"`` the λ added to every eigenvalue.
      damping_mode: ``"relative"`` or ``"absolute"``.
      trust_region: δ, the budget ``½ η² q`` of one step (a KL per retain answer token with
        ``quadratic``).
      max_step_size: η_max (``None``: no cap).
      ascend: ``True`` when the gradients are of an objective to *increase* (forget NLL, the
        default); ``False`` for a loss to *minimise* (any ``sga_jax.objectives`` loss).
      untapped: parameters without curvature: ``"freeze"`` (not moved) or ``"identity"`` (``g/λ``).
    """
    _check_args(damping, damping_mode, trust_region, max_step_size, untapped)
    eigen = dict(curvature or {})
    sign = 1.0 if ascend else -1.0

    def init_fn(params: Any) -> KFADEState:
        del params
        zero = jnp.zeros((), jnp.float32)
        return KFADEState(
            eigen=eigen, count=jnp.zeros((), jnp.int32), last_step_size=zero, last_quadratic=zero
        )

    def update_fn(
        updates: Any,
        state: KFADEState,
        params: Any = None,
        *,
        curvature: Mapping[str, KronEigen] | None = None,
        quadratic: Callable[[Any], jax.Array] | None = None,
        **extra_args: Any,
    ):
        del params, extra_args
        eig = state.eigen if curvature is None else curvature
        if not eig:
            raise ConfigError("kfade: no curvature (give it to kfade(...) or to update(..., curvature=...))")
        lam = block_damping(eig, damping) if damping_mode == "relative" else damping
        direction, quad = precondition(eig, updates, lam, untapped=untapped)
        direction = jax.tree.map(lambda d: jnp.asarray(sign, d.dtype) * d, direction)
        if quadratic is not None:
            quad = jnp.asarray(quadratic(direction), jnp.float32)
        eta = trust_region_step_size(quad, trust_region, max_step_size)
        new_updates = jax.tree.map(lambda d: eta.astype(d.dtype) * d, direction)
        count = optax.safe_int32_increment(state.count)
        return new_updates, KFADEState(state.eigen, count, last_step_size=eta, last_quadratic=quad)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["KFADEState", "kfade"]
