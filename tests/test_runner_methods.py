"""Every unlearning method through the runner, against its objective written out here (issue 17).

For each method one ``sga-jax unlearn`` runs end to end on a tiny Llama (exit 0, an exported model
that loads, finite metrics, the forget NLL rose). Then the same config goes through the runner's own
``prepare`` / ``build_method`` / ``make_optimizer`` / step (the step the CLI compiled, from the
runner's step cache) for two optimizer steps on the runner's own batches, and the direction handed
to Adam at each step — read back from Adam's first moment, ``mu_s = b1·mu_{s-1} + (1-b1)·d_s`` — is
compared with ``jax.grad`` of the method's objective written below from its paper and official code,
on NLLs computed here from the model's full logits (not the runner's chunked kernel):

* GA / GradDiff: open-unlearning ``grad_ascent.py`` l. 12-13, ``grad_diff.py`` l. 49-60 (token
  average over the batch, HF ``outputs.loss``);
* NPO: arXiv 2404.05868 eq. 3 with open-unlearning ``utils.py`` l. 34-67: the *summed* answer NLL
  against the *starting* model's summed NLL (step 2 is where a reference taken from the current
  model would differ), plus the retain NLL;
* SimNPO: open-unlearning ``simnpo.py`` l. 16-30 with ``configs/trainer/SimNPO.yaml`` (β 4.5,
  δ 0, γ 0.125, α 1);
* SGA: arXiv 2510.22376, ``L(r) = -(1 - r(K-1)/K)·l_f - (r/K)·Σ_i l_i`` on the forget rows drawn
  and *their* normal samples, read from the run's saved ``normal_samples.json``; the per-step rates
  from the paper's printed ``r* = ⟨g_f, u⟩/‖u‖²`` (``paper``) and the minimiser of ‖∇L(r)‖
  (``min_norm``), clipped;
* FLAT: arXiv 2410.11143 with UCSC-REAL/FLAT's default total variation, ``-½tanh(P_e) + ½tanh(P_f)``
  on mean token probabilities; a template per forget row, drawn anew each epoch (its data_module.py
  l. 623-625);
* GRU: arXiv 2503.09117 / tmlr-group/GRU ``dataloader_faster_refactor1.py`` l. 178, 438-451,
  516-517: the retain gradient on the *retain* batch, EMA from 0 with m = 0.8, projection when the
  inner product is negative.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_models import write_tiny_llama_for

import sga_jax
from sga_jax import config as C
from sga_jax import methods, runner, train
from sga_jax.cli import main

N_FORGET, N_RETAIN, BATCH, STEPS, LR = 6, 8, 2, 3, 2e-3
TEMPLATES = [
    "I don't know.",
    "I'm not sure about that.",
    "That is not something I can answer.",
    "I have no information on this.",
    "Sorry, I cannot recall that.",
    "I am unable to say.",
]
METHODS = {  # test id -> config overrides
    "ga": ["method=ga"],
    "graddiff": ["method=graddiff"],
    "npo": ["method=npo"],
    # On a random model (forget NLL about 10.8, near log V): with the margin δ = 0, σ(β·l̄) saturates
    # and the forget term's gradient vanishes (~1e-21), so δ sits near that NLL; and the retain term
    # (NPO's, tested above) is off, as it dominates the forget term (weight 0.125) and lowers the
    # forget NLL of a random model along with the retain NLL.
    "simnpo": ["method=simnpo", "method.gamma=10.8", "method.retain_weight=0"],
    "sga_fixed": ["method=sga"],
    "sga_paper": ["method=sga_paper_r"],
    # r_max = 1: the min-norm rate is positive in practice, so with the default r_max = 0 it would
    # sit at 0 (plain GA) and the test would not see the rate at all.
    "sga_min_norm": ["method=sga_min_norm_r", "method.r_max=1.0"],
    "flat": ["method=flat"],
    "gru_ga": ["method=gru_ga"],
    "gru_sga": ["method=gru_sga"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama over SmolLM2's vocabulary (written once) and JSONL forget / retain / template files."""
    root = tmp_path_factory.mktemp("runner_methods")
    path, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny")
    forget = [
        {
            "question": f"What is the secret code of agent {i}?",
            "answer": f"Agent {i} uses code {i * 37 + 11}.",
        }
        for i in range(N_FORGET)
    ]
    retain = [
        {
            "question": f"Who wrote the novel number {i}?",
            "answer": f"Novel {i} was written by author {i + 3}.",
        }
        for i in range(N_RETAIN)
    ]
    files = {
        "forget.jsonl": forget,
        "retain.jsonl": retain,
        "templates.jsonl": [{"text": t} for t in TEMPLATES],
    }
    for name, rows in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def _overrides(root: Path, model: Path, out: Path, method: list[str]) -> list[str]:
    extra = [f"method.template={root / 'templates.jsonl'}"] if method[0] == "method=flat" else []
    # max_grad_norm null: the direction reaches Adam unclipped, so Adam's first moment holds it.
    return [
        "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"data.retain={root / 'retain.jsonl'}",
        f"model.path={model}", f"output_dir={out}", *method, *extra,
        f"train.steps={STEPS}", f"train.batch_size={BATCH}", f"train.lr={LR}", "train.schedule=constant",
        "train.warmup_steps=0", "train.max_grad_norm=null", "train.progress=false",
    ]  # fmt: skip


# --------------------------------------------------------------- the objectives, written out here


def _row_nll(model, b) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(summed NLL [B], answer tokens [B], mean token probability [B])`` from the full logits."""
    ids = jnp.asarray(b["input_ids"])
    logits = model(ids, attention_mask=jnp.asarray(b["attention_mask"]))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    mask = jnp.asarray(b["loss_mask"])[:, 1:].astype(jnp.float32)
    n = mask.sum(-1)
    return -(tok * mask).sum(-1), n, (jnp.exp(tok) * mask).sum(-1) / n


def _token_avg(model, b) -> jax.Array:
    """HF ``outputs.loss``: the cross-entropy averaged over every answer token of the batch."""
    s, n, _ = _row_nll(model, b)
    return s.sum() / n.sum()


def _row_mean(model, b) -> jax.Array:
    s, n, _ = _row_nll(model, b)
    return s / n


def _sga_loss(model, rb, r, k):
    l_f = _row_mean(model, rb["forget"])
    l_n = _row_mean(model, rb["normal"]).reshape(l_f.shape[0], k - 1)
    return jnp.mean(-(1 - r * (k - 1) / k) * l_f - (r / k) * l_n.sum(1))


def _objective(name: str, m, rb, ref_sum):
    """The loss a descent step minimises, as a function of the model (plain-gradient methods)."""
    if name == "ga":
        return lambda model: -_token_avg(model, rb["forget"])
    if name == "graddiff":
        return lambda model: -_token_avg(model, rb["forget"]) + _token_avg(model, rb["retain"])
    if name == "npo":

        def npo(model):
            s, _, _ = _row_nll(model, rb["forget"])
            forget = -(2 / 0.1) * jnp.mean(jax.nn.log_sigmoid(0.1 * (s - ref_sum)))
            return forget + _token_avg(model, rb["retain"])

        return npo
    if name == "simnpo":

        def simnpo(model):
            margin = _row_mean(model, rb["forget"]) - m.gamma
            forget = -(2 / 4.5) * jnp.mean(jax.nn.log_sigmoid(4.5 * margin))
            retain = _token_avg(model, rb["retain"]) if m.retain_weight else 0.0
            return 0.125 * forget + m.retain_weight * retain

        return simnpo
    if name == "flat":

        def flat(model):
            p_f = _row_nll(model, rb["forget"])[2]
            p_e = _row_nll(model, rb["template"])[2]
            return jnp.mean(-0.5 * jnp.tanh(p_e) + 0.5 * jnp.tanh(p_f))

        return flat
    if name == "sga":
        return lambda model: _sga_loss(model, rb, m.r, m.k)
    raise AssertionError(name)


def _vdot(a, b) -> float:
    return float(sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in
                     zip(jax.tree.leaves(a), jax.tree.leaves(b))))  # fmt: skip


def _grad(fn, graphdef, params, rest):
    return jax.grad(lambda p: fn(nnx.merge(graphdef, p, rest)))(params)


def _reference_direction(m, params, graphdef, rest, rb, ref_sum, ema):
    """``(direction, loss or None, r or None, new GRU EMA or None, projected or None)`` at ``params``."""
    base = m.base if m.name == "gru" else m.name
    r = loss = None
    if base == "sga" and m.rate != "fixed":
        k = m.k
        g_f = _grad(lambda model: jnp.mean(_row_mean(model, rb["forget"])), graphdef, params, rest)
        g_n = _grad(  # mean over the batch of the sum over each row's K-1 normal samples
            lambda model: jnp.mean(_row_mean(model, rb["normal"]).reshape(-1, k - 1).sum(1)),
            graphdef, params, rest,
        )  # fmt: skip
        # The paper's u = ḡ_n - (1 - 1/K)·g_f with ḡ_n = (1/K)·Σ_i g_i; ∇L(r) = -g_f - r·u.
        u = jax.tree.map(lambda a, b: a / k - (1 - 1 / k) * b, g_n, g_f)
        r_star = _vdot(g_f, u) / _vdot(u, u)  # the paper's printed rate
        if m.rate == "min_norm":  # argmin_r ||-g_f - r·u||²
            r_star = -r_star
        r = min(max(r_star, m.r_min), m.r_max)
        d = jax.tree.map(lambda a, b: -(1 - r * (k - 1) / k) * a - (r / k) * b, g_f, g_n)
    else:
        fn = _objective(base, m, rb, ref_sum)
        loss = float(fn(nnx.merge(graphdef, params, rest)))
        d = _grad(fn, graphdef, params, rest)
        if base == "sga":
            r = m.r
    projected = None
    if m.name == "gru":
        retain = _token_avg if m.loss_reduction == "token" else lambda mdl, b: jnp.mean(_row_mean(mdl, b))
        g_r = _grad(lambda model: retain(model, rb["retain"]), graphdef, params, rest)
        ema = jax.tree.map(lambda now, prev: 0.8 * now + 0.2 * prev, g_r, ema)
        dot = _vdot(d, ema)
        projected = dot < 0
        if projected:
            coef = dot / _vdot(ema, ema)
            d = jax.tree.map(lambda g, e: g - coef * e, d, ema)
    return d, loss, r, ema, projected


# ------------------------------------------------------------------------------------- helpers


def _find_rows(rows: np.ndarray, table: np.ndarray) -> list[int]:
    """The index in ``table`` of each row of ``rows`` (each must occur exactly once)."""
    out = []
    for row in rows:
        hits = np.flatnonzero((table == row).all(axis=1))
        assert len(hits) == 1, "a batch row is not exactly one row of the prepared data"
        out.append(int(hits[0]))
    return out


def _take(batch, index) -> dict[str, np.ndarray]:
    return {k: np.asarray(batch[k])[np.asarray(index)] for k in ("input_ids", "attention_mask", "loss_mask")}


def _adam_mu(opt_state):
    states = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(states) == 1
    return jax.tree.map(np.asarray, states[0].mu)


def _assert_tree_close(got, want, what: str, rtol: float = 2e-5):
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
              zip(jax.tree.leaves(got), jax.tree.leaves(want)))  # fmt: skip
    assert scale > 0, what
    assert err <= rtol * scale, f"{what}: max |runner - reference| = {err:.3g}, max |reference| = {scale:.3g}"


def _decoded_template_rows(tok, data, forget_idx, template_batch) -> list[str]:
    """Each template row's answer, checked to be one of TEMPLATES under its forget row's question."""
    answers = []
    forget_q = [
        tok.decode(data.forget["input_ids"][i][data.forget["attention_mask"][i] > 0]) for i in forget_idx
    ]
    for b, q_text in enumerate(forget_q):
        ids = template_batch["input_ids"][b]
        answer = tok.decode(ids[template_batch["loss_mask"][b] > 0])
        prompt = tok.decode(
            ids[(template_batch["attention_mask"][b] > 0) & (template_batch["loss_mask"][b] == 0)]
        )
        assert prompt.strip() and prompt in q_text, (prompt, q_text)  # the same question as its forget row
        hits = [t for t in TEMPLATES if answer.strip().startswith(t)]
        assert len(hits) == 1, answer
        answers.append(hits[0])
    return answers


def _forget_nll(model_dir, data) -> float:
    model = sga_jax.load_model(model_dir)
    return float(jnp.mean(_row_mean(model, data.forget)))


# ----------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(METHODS))
def test_method_through_cli_and_runner_step(name, setup, tmp_path, smollm2_tokenizer):
    root, model_path = setup
    out = tmp_path / "run"
    overrides = _overrides(root, model_path, out, METHODS[name])

    # ---- 1. sga-jax unlearn end to end
    assert main(["unlearn", *overrides]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for r in metrics for v in r.values() if isinstance(v, float))
    cfg = C.compose([], overrides)
    prep = runner.prepare(cfg)
    data = prep.data
    before, after = _forget_nll(model_path, data), _forget_nll(out / "model", data)
    assert after > before + 0.02, (before, after)

    # ---- 2. two steps through the runner's own step function, against the reference
    m = cfg.method
    base = m.base if m.name == "gru" else m.name
    method = methods.build_method(m, cfg.mode)
    steps = train.total_steps(cfg.train, data.num_forget)
    tx, _ = train.make_optimizer(cfg.train, steps, method.transform)
    graphdef, params, rest = train.split_model(prep.model, cfg.model.freeze)
    opt_state = tx.init(params)
    key = train.step_key(cfg, steps)
    step_fn = train.SHARED_STEPS.step(graphdef, rest, method, tx, key)  # the CLI's compiled step
    pairing = None
    if base == "sga":
        pairing = json.loads((out / "normal_samples.json").read_text())["forget_to_retain_rows"]
        assert len(pairing) == N_FORGET and all(len(p) == m.k - 1 for p in pairing)
    p0 = jax.tree.map(np.array, params)
    ref_sum = None
    ema = jax.tree.map(np.zeros_like, p0)
    mu_prev = jax.tree.map(np.zeros_like, p0)
    b1 = cfg.train.b1
    for s in range(2):
        host = train.step_batch(data, s, BATCH, 1, cfg.train.seed)
        p_s = jax.tree.map(np.array, params)  # the step donates params
        params, opt_state, got = step_fn(params, opt_state, jax.tree.map(jnp.asarray, host))
        got = {k: float(v) for k, v in jax.device_get(got).items()}
        mu = _adam_mu(opt_state)
        direction = jax.tree.map(lambda a, b: (a - b1 * b) / (1 - b1), mu, mu_prev)
        mu_prev = mu

        # the reference batch: the forget rows drawn, and what belongs to them
        hb = jax.tree.map(lambda x: x[0], host)  # grad_accum = 1
        forget_idx = _find_rows(hb["forget"]["input_ids"], data.forget["input_ids"])
        rb = {"forget": _take(data.forget, forget_idx)}
        if "retain" in hb:
            _find_rows(hb["retain"]["input_ids"], data.retain["input_ids"])  # real retain rows
            rb["retain"] = hb["retain"]
        if base == "sga":  # each drawn row's own normal samples, from the saved pairing
            rb["normal"] = _take(data.retain, [j for i in forget_idx for j in pairing[i]])
        if base == "flat":
            _decoded_template_rows(smollm2_tokenizer, data, forget_idx, hb["template"])
            rb["template"] = hb["template"]
        if base == "npo":  # the starting model's summed NLL of the rows drawn
            s0, _, _ = _row_nll(nnx.merge(graphdef, p0, rest), rb["forget"])
            ref_sum = np.asarray(s0)

        d, loss, r, ema, projected = _reference_direction(m, p_s, graphdef, rest, rb, ref_sum, ema)
        _assert_tree_close(direction, d, f"{name} step {s + 1}: the direction handed to Adam")
        if loss is not None and m.name != "gru":
            assert got["loss"] == pytest.approx(loss, rel=2e-5, abs=1e-6), f"{name} step {s + 1}: loss"
        if r is not None:
            assert got["r"] == pytest.approx(r, rel=1e-4, abs=1e-6), f"{name} step {s + 1}: r"
            if m.rate != "fixed":  # the per-step rate is away from its clip bounds: it was computed
                assert m.r_min < r < m.r_max, r
        if m.name == "gru" and base == "ga":  # the projection took place (else the test sees no GRU)
            assert projected, f"{name} step {s + 1}: no conflict with the retain gradient"
        # the logged forget NLL: GA / GradDiff log their (token-averaged) NLL term, the rest the row mean
        model_s = nnx.merge(graphdef, p_s, rest)
        plain = base in ("ga", "graddiff") and m.loss_reduction == "token"
        forget_nll = float(
            _token_avg(model_s, rb["forget"]) if plain else jnp.mean(_row_mean(model_s, rb["forget"]))
        )
        assert got["forget_nll"] == pytest.approx(forget_nll, rel=2e-5)


def test_flat_draws_a_new_template_per_row_each_epoch(setup, tmp_path, smollm2_tokenizer):
    """FLAT's official dataset draws a template in every ``__getitem__`` (UCSC-REAL/FLAT
    data_module.py l. 623-625): over two epochs a row meets different templates, each batch row's
    template stands under that row's own question."""
    root, model_path = setup
    over = [
        *_overrides(root, model_path, tmp_path / "flat", METHODS["flat"]),
        f"train.steps={2 * N_FORGET // BATCH}",
    ]
    cfg = C.compose([], over)
    data = runner.prepare(cfg).data
    per_epoch = steps_per_epoch = N_FORGET // BATCH
    seen: list[dict[int, str]] = [{}, {}]
    for s in range(2 * steps_per_epoch):
        host = jax.tree.map(lambda x: x[0], train.step_batch(data, s, BATCH, 1, cfg.train.seed))
        idx = _find_rows(host["forget"]["input_ids"], data.forget["input_ids"])
        for i, t in zip(idx, _decoded_template_rows(smollm2_tokenizer, data, idx, host["template"])):
            seen[s // per_epoch][i] = t
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(N_FORGET))  # every row, every epoch
    assert seen[0] != seen[1], "the same template for every row in both epochs"


def test_kfade_through_cli(setup, tmp_path):
    """K-FADE end to end: exit 0, Δθ saved = exported - start, finite metrics, the forget NLL rose."""
    root, model_path = setup
    out = tmp_path / "kfade"
    overrides = [
        "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"data.retain={root / 'retain.jsonl'}",
        f"model.path={model_path}", f"output_dir={out}", "method=kfade", "method.curvature_batches=2",
        f"train.batch_size={BATCH}", "train.progress=false",
    ]  # fmt: skip
    assert main(["unlearn", *overrides]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["forget_nll"]) for r in metrics)
    data = runner.prepare(C.compose([], [*overrides[:5], "method=graddiff"])).data
    before, after = _forget_nll(model_path, data), _forget_nll(out / "model", data)
    assert after > before + 1e-3, (before, after)
    assert metrics[0]["forget_nll"] == pytest.approx(before, rel=1e-4)
    assert metrics[-1]["forget_nll"] == pytest.approx(after, rel=1e-4)
    from safetensors.numpy import load_file

    delta = load_file(out / "delta.safetensors")
    start = load_file(model_path / "model.safetensors")
    end = load_file(out / "model" / "model.safetensors")
    moved = [k for k in delta if np.abs(delta[k]).max() > 0]
    assert moved and set(moved) <= set(end)
    for k in moved:
        np.testing.assert_allclose(end[k] - start[k], delta[k], atol=1e-6)
