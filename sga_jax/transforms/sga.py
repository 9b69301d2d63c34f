"""Smoothed Gradient Ascent as an optax transform (arXiv 2510.22376).

The SGA loss (:func:`sga_jax.objectives.sga_loss`) of one forget sample and its K-1 normal
samples is ``L = -(1 - r(K-1)/K)·l_f - (r/K)·Σ_i l_i``; its gradient is

    d = ∇L = -g_f - r·u,    u = ḡ_n - (1 - 1/K)·g_f,    ḡ_n = (1/K)·Σ_i g_i,

with g_f = ∇l_f and g_i = ∇l_i. Given g_f and the normal-sample gradient apart, the transform can
also pick r per step (inner products over all parameters). Two per-step rates exist and both are
offered, named for what they are:

* ``rate="min_norm"``: ``r* = -⟨g_f, u⟩ / ‖u‖²``, the minimiser of ‖d(r)‖² = ‖g_f‖² + 2r⟨g_f, u⟩
  + r²‖u‖² for the gradient d above. In practice ⟨g_f, u⟩ < 0 (u holds -(1 - 1/K)·g_f), so this
  r* is *positive*: it ascends the normal samples.
* ``rate="paper"``: the paper's printed ``r* = +⟨g_f, u⟩ / ‖u‖²`` (arXiv 2510.22376, the "optimal
  smoothing rate" paragraph), derived there by minimising ‖d(r)‖ for its printed direction
  ``d(r) = -g_f + r·u``. That d is not the gradient of the paper's own loss (the sign of the
  r·u term differs from the ``-r·u`` above — a slip its reviewers also flagged), so which sign the
  authors meant is uncertain. Negative in practice, like the fixed rates the paper reports
  (r = -0.8, -2, -4, -8).

Both are kept in ``[r_min, r_max]``, default ``[-8, 0]``: a positive r ascends the normal
samples, so it is allowed only when asked for (``r_max > 0``). Below ``r_min`` r* is clipped. Above
``r_max`` — the paper's r* turns positive once gradient ascent has made the normal-sample gradients
align with and exceed the forget gradient (from step 4 of 7 in docs/tofu_study.md) — clipping to
``r_max = 0`` would silently make the step plain gradient ascent, so ``fallback`` says what to use
instead: ``"last"`` (default: the last admissible r*, or ``r`` before there is one), ``"fixed"``
(``r``) or ``"clip"`` (``r_max``). The state records the unclipped r* and how many steps left the
range, and the training loop reports them. The paper itself trains with a fixed r. The former
``rate="optimal"`` (our min-norm rate under an ambiguous name) is refused with an error naming the
two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sga_jax.config import check_smoothing_rate
from sga_jax.errors import ConfigError


class SGAState(NamedTuple):
    """State of :func:`sga`: the step count; ``r``, the smoothing rate used at the last step;
    ``r_star``, the per-step rate before it was kept in range (``r`` in fixed mode);
    ``out_of_range``, how many steps' r* left ``[r_min, r_max]``; ``last_admissible``, the latest
    r* inside the range (``r`` before there is one)."""

    count: chex.Array  # int32 scalar
    r: chex.Array  # float32 scalar
    r_star: chex.Array  # float32 scalar
    out_of_range: chex.Array  # int32 scalar
    last_admissible: chex.Array  # float32 scalar


FALLBACKS = ("last", "fixed", "clip")  # the r of a step whose per-step r* is above r_max


def _vdot(a: Any, b: Any) -> jax.Array:
    """⟨a, b⟩ over all leaves, accumulated in float32 (bf16 parameters included)."""
    f32 = optax.tree_utils.tree_cast
    return jnp.asarray(optax.tree_utils.tree_vdot(f32(a, jnp.float32), f32(b, jnp.float32)), jnp.float32)


PER_STEP_RATES = ("paper", "min_norm")


def check_rate(rate) -> None:
    """Refuse a rate that is not ``fixed``, ``paper``, ``min_norm`` or a schedule (one line)."""
    if rate == "optimal":
        raise ConfigError(
            "SGA rate 'optimal' is ambiguous and no longer accepted: use 'paper' (r* = +<g_f,u>/||u||^2, "
            "the paper's printed formula) or 'min_norm' (r* = -<g_f,u>/||u||^2, the step-norm minimiser)"
        )
    if isinstance(rate, str) and rate not in ("fixed", *PER_STEP_RATES):
        raise ConfigError(f"SGA rate must be 'fixed', 'paper', 'min_norm' or an optax schedule, got {rate!r}")
    if not isinstance(rate, str) and not callable(rate):
        raise ConfigError(f"SGA rate must be 'fixed', 'paper', 'min_norm' or an optax schedule, got {rate!r}")


def sga(
    r: float = -0.8,
    K: int = 4,
    *,
    rate: str | optax.Schedule = "fixed",
    r_min: float = -8.0,
    r_max: float = 0.0,
    fallback: str = "last",
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
      rate: ``"fixed"``; ``"paper"`` (per-step ``r* = +⟨g_f, u⟩/‖u‖²``, the paper's printed
        formula) or ``"min_norm"`` (per-step ``r* = -⟨g_f, u⟩/‖u‖²``, the step-norm minimiser),
        both clipped to ``[r_min, r_max]``; or an optax schedule ``count -> r`` (also clipped).
      r_min, r_max: range of the per-step / scheduled r (``r_max <= 1``; default ``[-8, 0]``: set
        ``r_max > 0`` to allow ascending the normal samples). Below ``r_min`` r is clipped.
      fallback: the r of a step whose per-step r* is above ``r_max``: ``"last"`` (the last r* in
        range, or ``r`` before one), ``"fixed"`` (``r``) or ``"clip"`` (``r_max``).
      eps: ``‖u‖²`` below this leaves r* at 0 (``u`` vanishes, every r gives the same step).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state :class:`SGAState` holds the r used.
      Extra args other than ``normal_grads`` are ignored, so it composes in ``optax.chain`` with
      transforms that take other extra args (e.g. ``gru``'s ``retain_grads``).
    """
    if int(K) != K or K < 1:
        raise ConfigError(f"SGA K (1 forget + K-1 normal samples) must be an integer >= 1, got {K}")
    check_smoothing_rate(r)
    if r_max > 1:
        raise ConfigError(f"SGA r_max must be <= 1, got {r_max}")
    if r_min > r_max:
        raise ConfigError(f"SGA r_min ({r_min}) must be <= r_max ({r_max})")
    check_rate(rate)
    if fallback not in FALLBACKS:
        raise ConfigError(f"SGA fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    K = int(K)
    shrink = 1.0 - 1.0 / K
    r0 = jnp.asarray(r, jnp.float32)

    def init_fn(params):
        del params
        # Distinct arrays per field: the train step donates its optimizer state, and one buffer
        # appearing twice in a donated tree is an error.
        f32 = lambda: jnp.asarray(r, jnp.float32)  # noqa: E731
        zero = lambda: jnp.zeros([], jnp.int32)  # noqa: E731
        return SGAState(count=zero(), r=f32(), r_star=f32(), out_of_range=zero(), last_admissible=f32())

    def in_range(r_star, state):
        """(the r to use, whether r* was out of range, the last admissible r*)."""
        above, below = r_star > r_max, r_star < r_min
        alt = {"last": state.last_admissible, "fixed": r0, "clip": jnp.float32(r_max)}[fallback]
        alt = jnp.clip(alt, r_min, r_max)  # method.r itself may lie outside a narrowed range
        r_t = jnp.where(above, alt, jnp.maximum(r_star, r_min))
        return r_t, above | below, jnp.where(above | below, state.last_admissible, r_star)

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
            r_t, r_star, last = (jnp.asarray(r, jnp.float32) for _ in range(3))  # distinct buffers
            out = jnp.bool_(False)
        else:
            if rate in PER_STEP_RATES:
                uu = _vdot(u, u)
                sign = 1.0 if rate == "paper" else -1.0
                r_star = jnp.where(uu > eps, sign * _vdot(g_f, u) / jnp.where(uu > eps, uu, 1.0), 0.0)
            else:
                r_star = jnp.asarray(rate(state.count), jnp.float32)
            r_t, out, last = in_range(r_star, state)

        direction = jax.tree.map(lambda gf, uu_: (-gf - r_t.astype(gf.dtype) * uu_).astype(gf.dtype), g_f, u)
        return direction, SGAState(
            count=optax.safe_int32_increment(state.count),
            r=r_t,
            r_star=r_star,
            out_of_range=state.out_of_range + out.astype(jnp.int32),
            last_admissible=last,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rate_record(opt_state) -> dict[str, jax.Array]:
    """What an ``sga`` transform state says of this step's rate: ``r`` (used), ``r_star`` (the
    per-step r* before it was kept in ``[r_min, r_max]``) and ``r_out`` (steps so far whose r* left
    that range); empty without an ``sga`` transform."""
    get = optax.tree_utils.tree_get
    r = get(opt_state, "r")
    if r is None:
        return {}
    return {"r": r, "r_star": get(opt_state, "r_star"), "r_out": get(opt_state, "out_of_range")}


def warn_rate_range(history: Sequence[Mapping[str, Any]], m: Any) -> str | None:
    """One warning line when SGA's per-step rate left ``[r_min, r_max]`` during the run (None if
    not): how often, the extreme r*, and what the steps used instead. ``history``: the training
    loop's step records (with :func:`rate_record`'s keys); ``m``: the method config (an
    ``SGAConfig``: ``rate``, ``r``, ``r_min``, ``r_max``, ``fallback``)."""
    recs = [h for h in history if "r_out" in h]
    if not recs or not recs[-1]["r_out"] or getattr(m, "rate", "fixed") == "fixed":
        return None
    above = [h["r_star"] for h in recs if h["r_star"] > m.r_max]
    below = [h["r_star"] for h in recs if h["r_star"] < m.r_min]
    parts = []
    if above:
        use = {"last": "the last r* in range (or method.r)", "fixed": f"method.r = {m.r:g}",
               "clip": f"r_max = {m.r_max:g}"}[m.fallback]  # fmt: skip
        parts.append(f"above r_max = {m.r_max:g} at {len(above)} (max {max(above):+.3g}; used {use})")
    if below:
        parts.append(f"below r_min = {m.r_min:g} at {len(below)} (min {min(below):+.3g}; clipped)")
    return (
        f"warning: SGA's per-step rate r* ({m.rate}) left its range at {len(above) + len(below)} of "
        f"{len(recs)} steps: {'; '.join(parts)}. metrics.jsonl logs r (used) and r_star per step."
    )
