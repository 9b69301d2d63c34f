"""K-FADE on the real SmolLM2-135M-Instruct (GGUF) with a few real TOFU items.

An honest small comparison: curvature (K-FAC, sampled Fisher) from 12 retain90 items, 3 uphill
Gauss-Newton steps on 4 forget01 items; then plain gradient ascent on the *same* parameters, its
step length line-searched so that its forget-NLL rise equals K-FADE's. The retain items the two are
judged on are held out (not used for the curvature). The numbers are printed; with
SGA_JAX_WRITE_RESULTS=1 they are also written to benchmarks/results/kfade_smollm2.md (so a plain test
run leaves the checkout untouched). Curvature over the attention output projections of all 30 layers (o_proj:
A, G 576 × 576), sequences of at most 40 tokens, to stay within ~60 s on 2 CPU cores.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import curvature as C
from sga_jax import kfac_math as M
from sga_jax import kfade_driver as KD
from sga_jax import logprobs

MAX_LEN = 40
LAYERS = r"self_attn/o_proj$"
# The shipped defaults (configs/method/kfade.yaml): damping 0.1 × each block's mean eigenvalue, step
# length from the exact Gauss-Newton quadratic on a retain batch, δ = 0.01 per step, KL guard 2×.
TRUST_REGION = 1e-2


def _tofu_batch(tok, rows, max_len=MAX_LEN):
    ids = np.zeros((len(rows), max_len), np.int32)
    attn = np.zeros_like(ids)
    loss = np.zeros_like(ids)
    for i, r in enumerate(rows):
        prompt = tok(f"Question: {r['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        answer = tok(" " + r["answer"], add_special_tokens=False)["input_ids"]
        seq = (prompt + answer)[:max_len]
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        loss[i, len(prompt) : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _retain_kl(old_logits, model, batch):
    """Mean KL(p_old ‖ p_new) per answer token of the held-out retain items."""
    t = C.lm_forward(model, batch)
    lp_new = jax.nn.log_softmax(t.logits, axis=-1)
    lp_old = jax.nn.log_softmax(old_logits, axis=-1)
    kl = jnp.sum(jnp.exp(lp_old) * (lp_old - lp_new), axis=-1)
    return float(jnp.sum(kl * t.weights) / jnp.sum(t.weights))


def test_kfade_beats_gradient_ascent_on_retain(smollm2_jax, smollm2_tokenizer, data_dir):
    t0 = time.time()
    model, tok = smollm2_jax, smollm2_tokenizer
    forget_rows = json.loads((data_dir / "tofu" / "forget01.json").read_text())[:4]
    retain_rows = json.loads((data_dir / "tofu" / "retain90.json").read_text())
    forget = _tofu_batch(tok, forget_rows)
    retain_fit = [_tofu_batch(tok, retain_rows[0:6]), _tofu_batch(tok, retain_rows[6:12])]
    retain_eval = _tofu_batch(tok, retain_rows[100:108])

    nll = jax.jit(lambda m, b: jnp.mean(logprobs.sequence_nll(m, b)))
    logits_fn = jax.jit(lambda m, b: C.lm_forward(m, b).logits)
    f0, r0 = float(nll(model, forget)), float(nll(model, retain_eval))
    old_retain_logits = logits_fn(model, retain_eval)

    eigen = C.estimate_curvature(model, retain_fit, fisher="sampled", key=0, layer_filter=LAYERS)
    t_curv = time.time() - t0
    steps: list = []
    new, _ = KD.kfade_unlearn(model, [forget], retain_fit, curvature=eigen, steps=3, history=steps)
    fk, rk = float(nll(new, forget)), float(nll(new, retain_eval))
    kl_k = _retain_kl(old_retain_logits, new, retain_eval)
    rise = fk - f0
    assert rise > 0.1, (f0, fk)  # the forget set is suppressed

    # plain gradient ascent on the same parameters (o_proj kernels), step length line-searched
    # (bisection on the forget NLL) to the same forget-NLL rise
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: KD.forget_nll(nnx.merge(graphdef, p, rest), forget)))(params)
    direction = jax.tree_util.tree_map_with_path(
        lambda path, g: g if M._key_names(path)[-2:] == ("o_proj", "kernel") else jnp.zeros_like(g), grads
    )

    def ga_model(step):
        return nnx.merge(graphdef, jax.tree.map(lambda p, g: p + step * g, params, direction), rest)

    lo, hi = 0.0, 1.0
    while float(nll(ga_model(hi), forget)) - f0 < rise:
        lo, hi = hi, hi * 4
    for _ in range(10):
        mid = 0.5 * (lo + hi)
        if float(nll(ga_model(mid), forget)) - f0 < rise:
            lo = mid
        else:
            hi = mid
    ga = ga_model(hi)
    fg, rg = float(nll(ga, forget)), float(nll(ga, retain_eval))
    kl_g = _retain_kl(old_retain_logits, ga, retain_eval)
    elapsed = time.time() - t0

    lines = [
        "# K-FADE vs gradient ascent on SmolLM2-135M-Instruct (GGUF Q4_1, float32)",
        "",
        f"Written by tests/test_kfade_smollm2.py on {datetime.date.today()} ({platform.machine()} CPU, "
        f"jax {jax.__version__}). Forget: TOFU forget01 items 0-3; curvature: retain90 items 0-11 "
        "(K-FAC, sampled Fisher, o_proj of all 30 layers); judged on held-out retain90 items 100-107. "
        f"Sequences <= {MAX_LEN} tokens. K-FADE at its defaults: 3 steps, damping 0.1 × each block's mean "
        f"eigenvalue, trust region {TRUST_REGION} per step sized by the exact Gauss-Newton quadratic on a "
        "retain batch, KL guard 2×. "
        "GA: one step along the forget-NLL gradient of the same o_proj kernels, length bisected to the "
        "same forget-NLL rise. Per step (η, predicted KL ½η²dᵀGd, measured KL on the in-sample retain "
        "batch): "
        + "; ".join(f"{r['eta']:.3g}, {r['predicted_kl']:.4f}, {r['retain_kl']:.4f}" for r in steps)
        + ".",
        "",
        "| method | forget NLL | Δ forget NLL | retain NLL | Δ retain NLL | retain KL / token |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| before | {f0:.4f} | | {r0:.4f} | | |",
        f"| K-FADE | {fk:.4f} | {fk - f0:+.4f} | {rk:.4f} | {rk - r0:+.4f} | {kl_k:.5f} |",
        f"| gradient ascent | {fg:.4f} | {fg - f0:+.4f} | {rg:.4f} | {rg - r0:+.4f} | {kl_g:.5f} |",
        "",
        f"Curvature estimation {t_curv:.1f} s, whole test {elapsed:.1f} s.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if os.environ.get("SGA_JAX_WRITE_RESULTS") == "1":
        _write_results(report)

    assert abs((fg - f0) - rise) < 0.02 * rise + 1e-3  # matched forget-NLL rise
    assert abs(rk - r0) < abs(rg - r0), (rk - r0, rg - r0)
    assert kl_k < kl_g, (kl_k, kl_g)


def _write_results(report: str) -> None:
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "kfade_smollm2.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(report)
    tmp.replace(out)
