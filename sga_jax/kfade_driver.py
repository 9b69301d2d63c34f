"""The K-FADE driver: K-FADE has no training loop, so the runner hands it the prepared model and
data instead of :func:`sga_jax.train.train_loop`.

Retain-set K-FAC curvature, then ``method.steps`` uphill Gauss-Newton steps on the forget NLL
(:func:`kfade_unlearn`: the ``kfade`` transform is fed the curvature as an extra argument); Δθ is
saved as ``delta.safetensors`` for ``sga-jax reapply``, the model exported to ``output_dir/model``
and the forget NLL before and after written to ``metrics.jsonl``.

The step length: K-FAC's own quadratic model ``½ Δθᵀ(F + λI)Δθ`` underestimates the retain
outputs' curvature along a full-model step by orders of magnitude (on SmolLM2-135M ~7000×: 220× to
3300× within each block, another ~40× because all 210 blocks push the same outputs), so a trust
region on it lets one step change the retain outputs by a KL of ~2 nats per token. The default
``step_length="gauss_newton"`` takes the length from the exact Gauss-Newton quadratic along the
step instead (one jvp; Martens & Grosse 2015 §6.4), and the KL guard measures the real KL after
each step (docs/design.md, "K-FADE").
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import config as C
from sga_jax.curvature import estimate_curvature
from sga_jax.errors import ConfigError, DataError, DivergenceError
from sga_jax.eval.generate import greedy_generate
from sga_jax.kfac_math import KronEigen
from sga_jax.logprobs import batched_nll, sequence_nll
from sga_jax.models import lora
from sga_jax.models.hf import save_model
from sga_jax.output_space import gauss_newton_quadratic, kl_between
from sga_jax.reapply import save_delta
from sga_jax.rundir import write_text
from sga_jax.train import RunResult
from sga_jax.transforms.kfade import kfade

Array = jax.Array
Batch = dict[str, np.ndarray]
_KEYS = ("input_ids", "attention_mask", "loss_mask")
_WORD = re.compile(r"[^\W\d_]{2}")  # two letters in a row, any script


def forget_nll(model: nnx.Module, batch: Mapping[str, Array]) -> Array:
    """The default K-FADE objective (to be *increased*): the mean over rows of the token-mean NLL
    of the ``loss_mask`` tokens (:func:`sga_jax.logprobs.sequence_nll`: chunked LM head, no
    ``[B, T, V]`` float32 logits)."""
    return jnp.mean(sequence_nll(model, batch))


STEP_LENGTHS = ("gauss_newton", "kfac")


def kfade_unlearn(
    model: nnx.Module,
    forget_batches: Iterable[Mapping[str, Array]],
    retain_batches: Iterable[Mapping[str, Array]] | None = None,
    *,
    steps: int = 3,
    damping: float = 0.1,
    damping_mode: str = "relative",
    trust_region: float = 1e-2,
    max_step_size: float | None = None,
    step_length: str = "gauss_newton",
    kl_guard: float | None = 2.0,
    objective: Callable[[nnx.Module, Mapping[str, Array]], Array] = forget_nll,
    curvature: Mapping[str, KronEigen] | None = None,
    ekfac: bool = False,
    untapped: str = "freeze",
    chunk_rows: int = 4,
    history: list[dict[str, float]] | None = None,
    log: Callable[[str], None] | None = None,
    **curvature_kwargs: Any,
) -> tuple[nnx.Module, nnx.State]:
    """K-FADE: ``steps`` uphill Gauss-Newton steps on ``objective`` (forget NLL by default) with the
    retain set's K-FAC curvature (estimated from ``retain_batches`` unless ``curvature`` is given).

    ``step_length``: ``"gauss_newton"`` (default) sizes each step by the exact Gauss-Newton
    quadratic of the retain outputs on the first retain batch (the probe), ``½ η² dᵀGd = δ``, so δ
    is a KL per retain answer token; ``"kfac"`` by K-FAC's own quadratic (module docstring).
    ``kl_guard``: a step whose measured probe KL exceeds ``kl_guard × δ`` is shrunk (one ``log``
    line), or raises :class:`DivergenceError` (None: off). ``history`` receives per step
    ``forget_nll`` (before it), ``eta``, ``predicted_kl``, ``retain_kl`` and ``shrink``. Returns
    ``(new_model, delta)``, ``delta = θ_new − θ`` (an ``nnx.State``); ``model`` is unchanged."""
    _check_options(steps, step_length, kl_guard)
    forget_batches, retain_batches, curvature = _inputs(
        model, forget_batches, retain_batches, curvature, step_length, kl_guard, ekfac, curvature_kwargs
    )
    # With LoRA adapters only they move (the base is frozen); otherwise every parameter.
    graphdef, params, rest = nnx.split(model, lora.lora_filter(model), ...)
    kw = dict(damping=damping, damping_mode=damping_mode, max_step_size=max_step_size, untapped=untapped)
    tx = kfade(trust_region=trust_region, **kw)
    stepper = _Stepper(graphdef, rest, tx, objective, retain_batches and retain_batches[0], chunk_rows)
    new = _take_steps(stepper, tx.init(params), params, forget_batches, curvature, int(steps),
                      step_length == "gauss_newton", (trust_region, kl_guard), history, log)  # fmt: skip
    new_model = nnx.merge(graphdef, new, rest)
    delta = (
        _merged_delta(model, new_model) if lora.has_lora(model) else jax.tree.map(jnp.subtract, new, params)
    )
    return new_model, delta


def _take_steps(stepper, state, params, forget_batches, curvature, steps, exact, guard, history, log):
    """The K-FADE steps from ``params``; each step's record is appended to ``history``."""
    trust_region, kl_guard = guard
    new = params
    for s in range(1, steps + 1):
        loss, grads = stepper.forget_grad(new, forget_batches)
        cand, state = stepper.apply(new, grads, state, curvature, exact)
        eta = float(state.last_step_size)
        rec = {
            "step": s,
            "forget_nll": loss,
            "eta": eta,
            "predicted_kl": 0.5 * eta**2 * float(state.last_quadratic),
        }
        if kl_guard is not None:
            cand, checked = _guarded(stepper, new, cand, s, trust_region, kl_guard, log)
            rec.update(checked)
        new = cand
        if history is not None:
            history.append(rec)
    return new


def _inputs(model, forget_batches, retain_batches, curvature, step_length, kl_guard, ekfac, kwargs):
    """The batches on the device and the curvature (estimated unless given), checked."""
    forget_batches = [_on_device(b) for b in forget_batches]
    if not forget_batches:
        raise DataError("no forget batches given")
    retain_batches = None if retain_batches is None else [_on_device(b) for b in retain_batches]
    if curvature is None:
        if not retain_batches:
            raise ConfigError("give retain_batches (or a precomputed curvature)")
        curvature = estimate_curvature(model, retain_batches, ekfac=ekfac, **kwargs)
    if not retain_batches and (step_length == "gauss_newton" or kl_guard is not None):
        raise ConfigError(
            "the Gauss-Newton step length and the KL guard measure the retain outputs: give retain_batches "
            "(or step_length='kfac', kl_guard=None)"
        )
    return forget_batches, retain_batches, curvature


def _check_options(steps: int, step_length: str, kl_guard: float | None) -> None:
    if int(steps) < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if step_length not in STEP_LENGTHS:
        raise ConfigError(f"unknown step_length={step_length!r}; use one of {', '.join(STEP_LENGTHS)}")
    if kl_guard is not None and not kl_guard >= 1:
        raise ConfigError(f"kl_guard must be >= 1 (a factor of the trust region) or None, got {kl_guard}")


def _on_device(b: Mapping[str, Any]) -> dict[str, Array]:
    return {k: jnp.asarray(v) for k, v in b.items()}


class _Stepper:
    """The jitted pieces of a K-FADE step over one model structure: the forget gradient (a mean
    over every forget row), the transform's update (sized on the retain probe batch) and the
    measured retain KL of a candidate step."""

    def __init__(self, graphdef, rest, tx, objective, probe, chunk_rows: int):
        self.probe = probe

        def value_and_grad(params, batch):
            return jax.value_and_grad(lambda p: objective(nnx.merge(graphdef, p, rest), batch))(params)

        def apply(params, grads, state, curvature, probe, exact):
            gn = None
            if exact:
                gn = lambda d: gauss_newton_quadratic(graphdef, params, rest, d, probe, chunk_rows=chunk_rows)  # noqa: E731
            updates, state = tx.update(grads, state, params, curvature=curvature, quadratic=gn)
            return jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates), state

        self._vg = jax.jit(value_and_grad)
        self._apply = jax.jit(apply, static_argnames=("exact",))
        self._kl = jax.jit(lambda a, b, batch: kl_between(graphdef, a, b, rest, batch, chunk_rows=chunk_rows))

    def forget_grad(self, params, batches) -> tuple[float, Any]:
        # Each batch's gradient is of its mean over rows: weight by rows so that a last, smaller batch
        # counts as many rows as it holds (the gradient is of the mean over every forget row).
        rows = [int(jnp.shape(b["input_ids"])[0]) for b in batches]
        loss, grads = 0.0, None
        for b, n in zip(batches, rows):
            value, g = self._vg(params, b)
            w = n / sum(rows)
            loss += float(value) * w
            g = jax.tree.map(lambda x, w=w: x * w, g)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        return loss, grads

    def apply(self, params, grads, state, curvature, exact: bool):
        return self._apply(params, grads, state, curvature, self.probe, exact=exact)

    def retain_kl(self, old, new) -> float:
        return float(self._kl(old, new, self.probe))


def _guarded(stepper: _Stepper, old, cand, step: int, delta: float, factor: float, log, shrinks: int = 4):
    """The guard rail: shrink a step whose measured retain KL exceeds ``factor × δ`` (toward δ,
    assuming KL ∝ η²) until it does not; raise when it still does after ``shrinks`` tries."""
    kl, scale = stepper.retain_kl(old, cand), 1.0
    first = kl
    for _ in range(shrinks):
        if kl <= factor * delta:
            break
        f = math.sqrt(delta / kl)
        scale *= f
        cand = jax.tree.map(lambda o, c, f=f: o + (c - o) * jnp.asarray(f, c.dtype), old, cand)
        kl = stepper.retain_kl(old, cand)
    if kl > factor * delta:
        raise DivergenceError(
            f"K-FADE step {step}: the measured retain KL stays {kl:.3g} per answer token, above "
            f"{factor:g} x the trust region {delta:g}, after shrinking the step {shrinks} times: lower "
            "method.trust_region or raise method.damping"
        )
    if scale < 1.0 and log is not None:
        log(
            f"K-FADE step {step}: measured retain KL {first:.3g} per answer token > {factor:g} x "
            f"trust region {delta:g}; step shrunk x{scale:.3g} (KL now {kl:.3g})"
        )
    return cand, {"retain_kl": kl, "shrink": scale}


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
    """Run K-FADE on ``prepared`` (a :class:`sga_jax.runner.Prepared`) into the locked ``out``.

    Nothing is exported when the unlearned model no longer answers retain prompts in words
    (:func:`check_answers_in_words`): a :class:`DivergenceError` names the step budget instead."""
    m = cfg.method
    assert isinstance(m, C.KFADEConfig)
    data, bs = prepared.data, cfg.train.batch_size
    assert data.retain is not None  # KFADEConfig.needs holds "retain"
    before = float(np.mean(batched_nll(prepared.model, data.forget)))
    steps: list[dict[str, float]] = []
    model, delta = kfade_unlearn(
        prepared.model,
        batches(data.forget, bs, keep_last=True),
        batches(data.retain, bs, m.curvature_batches),
        steps=m.steps,
        damping=m.damping,
        damping_mode=m.damping_mode,
        trust_region=m.trust_region,
        max_step_size=m.max_step_size,
        step_length=m.step_length,
        kl_guard=m.kl_guard,
        ekfac=m.ekfac,
        fisher=m.fisher,
        history=steps,
        log=lambda msg: print(f"sga-jax: {msg}", file=sys.stderr),
    )
    after = float(np.mean(batched_nll(model, data.forget)))
    check_answers_in_words(model, prepared.tokenizer, data.retain, what=f"K-FADE after {m.steps} steps")
    save_delta(delta, model, out / "delta.safetensors", metadata={"method": "kfade"})
    lora_save = cfg.model.lora.save if cfg.model.lora else "merged"
    model_dir = save_model(model, out / "model", tokenizer=prepared.tokenizer, overwrite=True, lora=lora_save)
    # metrics.jsonl: step 0, then each step's size, predicted and measured retain KL, and the forget
    # NLL after it (the next step's starting value; the last one measured on every forget row).
    nll_after = [r["forget_nll"] for r in steps[1:]] + [after]
    history = [{"step": 0, "forget_nll": before}]
    history += [
        {**{k: v for k, v in r.items() if k != "forget_nll"}, "forget_nll": n}
        for r, n in zip(steps, nll_after)
    ]
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    return RunResult(out, model_dir, m.steps, history, model)


def check_answers_in_words(
    model: Any,
    tokenizer: Any,
    retain: Batch,
    *,
    rows: int = 4,
    max_new_tokens: int = 24,
    what: str = "the model",
) -> list[str]:
    """Greedy answers to the first ``rows`` retain prompts; raise :class:`DivergenceError` when
    fewer than half of them hold a word (two letters in a row): a model that answers only newlines
    or punctuation has been destroyed, not unlearned. Returns the answers."""
    ids, attn, loss = (retain[k][:rows] for k in _KEYS)
    prompts = []
    for i in range(ids.shape[0]):
        first = int(np.argmax(loss[i])) if loss[i].any() else int(attn[i].sum())
        prompts.append([int(t) for t, a in zip(ids[i, :first], attn[i, :first]) if a])
    res = greedy_generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=len(prompts),
        tokenizer=tokenizer,
    )
    worded = sum(bool(_WORD.search(t)) for t in res.texts)
    if 2 * worded < len(res.texts):
        sample = " | ".join(repr(t[:40]) for t in res.texts[:2])
        raise DivergenceError(
            f"{what}, {len(res.texts) - worded} of {len(res.texts)} retain prompts get no answer in words "
            f"(e.g. {sample}); nothing was exported: lower method.trust_region or method.steps"
        )
    return res.texts


__all__ = ["STEP_LENGTHS", "batches", "check_answers_in_words", "forget_nll", "kfade_unlearn", "run_kfade"]
