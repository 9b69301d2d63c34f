"""The optimizer of a run: AdamW with warm-up and decay after the method's own transform, and the
step counts it is sized by (steps per run, per epoch, of warm-up)."""

from __future__ import annotations

import math
from typing import Any

import optax

from sga_jax import config as C
from sga_jax.reference import with_mask


def total_steps(cfg: C.TrainConfig, num_rows: int) -> int:
    """``train.steps``, else ``ceil(epochs · rows / batch_size)``."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * num_rows / cfg.batch_size))


def steps_per_epoch(cfg: C.TrainConfig, steps: int, num_rows: int | None) -> int:
    """Optimizer steps per pass over ``num_rows`` rows (``ceil``, as HF's dataloader without
    ``drop_last``); unknown rows: ``steps / train.epochs``."""
    if num_rows is None:
        return max(1, round(steps / cfg.epochs))
    return max(1, math.ceil(num_rows / cfg.batch_size))


def warmup_steps(cfg: C.TrainConfig, steps: int, num_rows: int | None = None) -> int:
    """The warm-up length: ``train.warmup_steps`` if set, else ``warmup_ratio · steps``, else
    ``warmup_epochs`` epochs as open-unlearning counts them (src/trainer/__init__.py l. 33-42:
    ``int(warmup_epochs · rows // batch)``), at most ``steps - 1``."""
    if cfg.warmup_steps is not None:
        n = cfg.warmup_steps
    elif cfg.warmup_ratio is not None:
        n = int(cfg.warmup_ratio * steps)
    elif cfg.warmup_epochs and num_rows is not None:
        n = int(cfg.warmup_epochs * num_rows // cfg.batch_size)
    elif cfg.warmup_epochs:  # rows unknown: epochs of steps_per_epoch(steps / epochs) steps
        n = int(cfg.warmup_epochs * steps_per_epoch(cfg, steps, None))
    else:
        n = 0
    return min(n, max(steps - 1, 0))


def make_optimizer(
    cfg: C.TrainConfig,
    steps: int,
    method_tx: optax.GradientTransformation | None = None,
    mask: Any = None,
    *,
    num_rows: int | None = None,
):
    """``chain(method transform, clip_by_global_norm, adamw(warm-up + decay))``; with a parameter
    ``mask`` (:func:`sga_jax.reference.trainable_mask`) followed by ``masked(mask)``. ``num_rows``
    sizes a warm-up given in epochs (:func:`warmup_steps`)."""
    warmup = warmup_steps(cfg, steps, num_rows)
    decay_steps = max(steps - warmup, 1)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])
        if warmup
        else decay
    )
    parts = [] if method_tx is None else [method_tx]
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*with_mask(parts, mask)), schedule


__all__ = ["make_optimizer", "steps_per_epoch", "total_steps", "warmup_steps"]
