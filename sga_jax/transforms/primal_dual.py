"""``primal_dual``: the dual variable of PDU (Entesari et al. 2025, arXiv 2506.05314) as an optax
transform, so that it lives in the optimizer state (checkpointed and resumed with it).

PDU minimises ``L_f`` subject to ``l_r <= ε`` through the Lagrangian ``L_f + λ·(l_r - ε)``: gradient
descent in the parameters, ``g = ∇L_f + λ·∇l_r``, and projected ascent in the dual,
``λ ← max(0, λ + η_λ·(l_r - ε))`` (open-unlearning src/trainer/unlearn/pdu.py l. 40-72,
``final_loss_value``, with ``dual_update_upon: step``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from sga_jax.errors import ConfigError


class PrimalDualState(NamedTuple):
    count: jax.Array  # optimizer steps taken
    dual: jax.Array  # λ for the next step
    used: jax.Array  # λ of the step just taken


def primal_dual(
    dual_init: float, *, eps: float, step_size: float = 1.0, warmup_steps: int = 0
) -> optax.GradientTransformationExtraArgs:
    """Adds ``λ·retain_grads`` to the incoming updates (the gradient of the forget loss), then
    takes the dual step ``λ ← max(0, λ + step_size·(retain_loss - eps))`` on steps ``>= warmup_steps``.

    The extra args: ``retain_grads``, the gradient of the retain loss ``l_r``, and
    ``retain_loss``, its value, at the current parameters. This step's update uses the λ of the
    previous steps, as pdu.py computes the loss before it moves λ.

    Args:
      dual_init: λ at the start (open-unlearning's ``alpha``), >= 0.
      eps: the retain-loss bound ε (its ``retain_loss_eps``).
      step_size: the dual step η_λ (its ``dual_step_size``).
      warmup_steps: steps before λ moves (its ``dual_warmup_epochs`` × steps per epoch).
    """
    if dual_init < 0 or step_size < 0 or warmup_steps < 0:
        raise ConfigError(
            f"primal_dual: dual_init, step_size and warmup_steps must be >= 0, got "
            f"{dual_init}, {step_size}, {warmup_steps}"
        )

    def init_fn(params):
        del params
        lam = jnp.asarray(dual_init, jnp.float32)
        return PrimalDualState(count=jnp.zeros([], jnp.int32), dual=lam, used=lam)

    def update_fn(updates, state, params=None, *, retain_grads=None, retain_loss=None, **extra_args):
        del params, extra_args
        if retain_grads is None or retain_loss is None:
            raise ConfigError("primal_dual needs the extra args retain_grads and retain_loss")
        lam = state.dual
        updates = jax.tree.map(lambda u, g: u + (lam * g).astype(u.dtype), updates, retain_grads)
        moved = jnp.maximum(0.0, lam + step_size * (jnp.asarray(retain_loss, jnp.float32) - eps))
        new = jnp.where(state.count >= warmup_steps, moved, lam)
        return updates, PrimalDualState(count=state.count + 1, dual=new, used=lam)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dual_record(opt_state) -> dict[str, jax.Array]:
    """``{"dual": λ used this step, "dual_next": λ for the next}`` from a state holding a
    ``primal_dual`` transform; empty without one."""
    used = otu.tree_get(opt_state, "used")
    return {} if used is None else {"dual": used, "dual_next": otu.tree_get(opt_state, "dual")}
