"""The K-FADE driver: K-FADE has no training loop, so the runner hands it the prepared model and
data instead of :func:`sga_jax.train.train_loop`.

Retain-set K-FAC curvature, then ``method.steps`` uphill Gauss-Newton steps on the forget NLL
(:func:`kfade_unlearn`: the ``kfade`` transform is fed the curvature as an extra argument); Δθ is
saved as ``delta.safetensors`` for ``sga-jax reapply``, the model exported to ``output_dir/model``
and the forget NLL before and after written to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import config as C
from sga_jax.curvature import estimate_curvature
from sga_jax.errors import ConfigError, DataError
from sga_jax.kfac_math import KronEigen
from sga_jax.logprobs import batched_nll, sequence_nll
from sga_jax.models import lora
from sga_jax.models.hf import save_model
from sga_jax.reapply import save_delta
from sga_jax.rundir import write_text
from sga_jax.train import RunResult
from sga_jax.transforms.kfade import kfade

Array = jax.Array
Batch = dict[str, np.ndarray]
_KEYS = ("input_ids", "attention_mask", "loss_mask")


def forget_nll(model: nnx.Module, batch: Mapping[str, Array]) -> Array:
    """The default K-FADE objective (to be *increased*): the mean over rows of the token-mean NLL
    of the ``loss_mask`` tokens (:func:`sga_jax.logprobs.sequence_nll`: chunked LM head, no
    ``[B, T, V]`` float32 logits)."""
    return jnp.mean(sequence_nll(model, batch))


def kfade_unlearn(
    model: nnx.Module,
    forget_batches: Iterable[Mapping[str, Array]],
    retain_batches: Iterable[Mapping[str, Array]] | None = None,
    *,
    steps: int = 3,
    damping: float = 1e-3,
    trust_region: float = 1e-2,
    max_step_size: float | None = None,
    objective: Callable[[nnx.Module, Mapping[str, Array]], Array] = forget_nll,
    curvature: Mapping[str, KronEigen] | None = None,
    ekfac: bool = False,
    untapped: str = "freeze",
    **curvature_kwargs: Any,
) -> tuple[nnx.Module, nnx.State]:
    """K-FADE: ``steps`` uphill Gauss-Newton steps on ``objective`` (forget NLL by default), with
    the retain set's K-FAC curvature (estimated once from ``retain_batches`` unless ``curvature``,
    the output of :func:`sga_jax.curvature.estimate_curvature`, is given).

    Returns ``(new_model, delta)`` where ``delta`` (an ``nnx.State`` of params) is the total update
    ``θ_new − θ`` (save it with ``sga_jax.reapply.save_delta``). ``model`` is left unchanged.
    """
    if int(steps) < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    forget_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in forget_batches]
    if not forget_batches:
        raise DataError("no forget batches given")
    if curvature is None:
        if retain_batches is None:
            raise ConfigError("give retain_batches (or a precomputed curvature)")
        curvature = estimate_curvature(model, retain_batches, ekfac=ekfac, **curvature_kwargs)
    # With LoRA adapters only they move (the base is frozen); otherwise every parameter.
    graphdef, params, rest = nnx.split(model, lora.lora_filter(model), ...)
    tx = kfade(damping=damping, trust_region=trust_region, max_step_size=max_step_size, untapped=untapped)
    state = tx.init(params)

    @jax.jit
    def grad_fn(params, batch):
        return jax.grad(lambda p: objective(nnx.merge(graphdef, p, rest), batch))(params)

    @jax.jit
    def apply(params, grads, state, curvature):
        updates, state = tx.update(grads, state, params, curvature=curvature)
        return jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates), state

    # Each batch's gradient is of its mean over rows: weight by rows so that a last, smaller batch
    # counts as many rows as it holds (the gradient is of the mean over every forget row).
    rows = [int(jnp.shape(b["input_ids"])[0]) for b in forget_batches]
    new = params
    for _ in range(int(steps)):
        grads = None
        for b, n in zip(forget_batches, rows):
            g = jax.tree.map(lambda x, n=n: x * (n / sum(rows)), grad_fn(new, b))
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        new, state = apply(new, grads, state, curvature)
    delta = jax.tree.map(lambda n, o: n - o, new, params)
    new_model = nnx.merge(graphdef, new, rest)
    return new_model, (_merged_delta(model, new_model) if lora.has_lora(model) else delta)


def _merged_delta(model: nnx.Module, new_model: nnx.Module) -> nnx.State:
    """Δθ of the merged weights of a LoRA model, ``(alpha/r)(A'B' − AB)`` per adapted layer, under
    the base kernels' names (so that :mod:`sga_jax.reapply` applies it to a plain checkpoint)."""
    before, after = lora.adapters(model), lora.adapters(new_model)
    return nnx.from_flat_state(
        [((*p, "kernel"), nnx.Param(after[p].lora.delta() - lin.lora.delta())) for p, lin in before.items()]
    )


def batches(b: Batch, size: int, limit: int | None = None, *, keep_last: bool = False) -> list[Batch]:
    """``b`` cut into batches of ``size`` rows. Curvature batches share one shape (one compilation;
    a partial batch adds little: dropped unless it is the only one); the uphill gradient keeps
    every forget row (``keep_last``: the last, smaller batch too)."""
    n = b["input_ids"].shape[0]
    stop = n if keep_last else (n - n % size or n)
    out = [{k: b[k][i : i + size] for k in _KEYS} for i in range(0, stop, size)]
    return out[:limit] if limit else out


def run_kfade(cfg: C.RunConfig, out: Path, prepared: Any) -> RunResult:
    """Run K-FADE on ``prepared`` (a :class:`sga_jax.runner.Prepared`) into the locked ``out``."""
    m = cfg.method
    assert isinstance(m, C.KFADEConfig)
    data, bs = prepared.data, cfg.train.batch_size
    assert data.retain is not None  # KFADEConfig.needs holds "retain"
    before = float(np.mean(batched_nll(prepared.model, data.forget)))
    model, delta = kfade_unlearn(
        prepared.model,
        batches(data.forget, bs, keep_last=True),
        batches(data.retain, bs, m.curvature_batches),
        steps=m.steps,
        damping=m.damping,
        trust_region=m.trust_region,
        max_step_size=m.max_step_size,
        ekfac=m.ekfac,
        fisher=m.fisher,
    )
    after = float(np.mean(batched_nll(model, data.forget)))
    save_delta(delta, model, out / "delta.safetensors", metadata={"method": "kfade"})
    lora_save = cfg.model.lora.save if cfg.model.lora else "merged"
    model_dir = save_model(model, out / "model", tokenizer=prepared.tokenizer, overwrite=True, lora=lora_save)
    history = [{"step": 0, "forget_nll": before}, {"step": m.steps, "forget_nll": after}]
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    return RunResult(out, model_dir, m.steps, history, model)


__all__ = ["batches", "forget_nll", "kfade_unlearn", "run_kfade"]
