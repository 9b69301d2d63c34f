"""The K-FADE driver: K-FADE has no training loop, so the runner hands it the prepared model and
data instead of :func:`sga_jax.train.train_loop`.

Retain-set K-FAC curvature, then ``method.steps`` uphill Gauss-Newton steps on the forget NLL
(:func:`sga_jax.curvature.kfade_unlearn`); Δθ is saved as ``delta.safetensors`` for
``sga-jax reapply``, the model exported to ``output_dir/model``, and the forget NLL before and after
written to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sga_jax import config as C
from sga_jax.curvature import kfade_unlearn
from sga_jax.logprobs import batched_nll
from sga_jax.models.hf import save_model
from sga_jax.reapply import save_delta
from sga_jax.rundir import write_text
from sga_jax.train import RunResult

Batch = dict[str, np.ndarray]
_KEYS = ("input_ids", "attention_mask", "loss_mask")


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
    model_dir = save_model(model, out / "model", tokenizer=prepared.tokenizer, overwrite=True)
    history = [{"step": 0, "forget_nll": before}, {"step": m.steps, "forget_nll": after}]
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    return RunResult(out, model_dir, m.steps, history, model)
