"""The baselines with a frozen reference, their own data or their own forget loss (issue 25: RMU,
UNDIAL, IdkDPO, IdkNLL, WGA, SatImp, CE-U, PDU) through the runner's own step, against a torch
re-derivation from open-unlearning's code.

For each method the runner prepares its data (``runner.prepare``: forget / retain rows, IdK answers
drawn per row and epoch), builds its method, optimizer, parameter mask and reference
(``train.method_setup``) and takes two optimizer steps. The same two steps run in PyTorch on the same
tiny HF checkpoint loaded by transformers, with the loss written here from open-unlearning
(locuslab/open-unlearning d3d7cf9) — a ``copy.deepcopy`` of the starting model as its reference, a
forward hook on ``model.layers[l]`` for RMU's activations, ``torch.optim.AdamW`` over the parameters
its trainer would optimise — and at each step the loss, the gradient (read back from Adam's first
moment) and the updated parameters are compared by HF parameter name:

* RMU: ``src/trainer/unlearn/rmu.py`` l. 83-173 (``forward_with_cache``, ``compute_activation_loss``,
  ``EMBED_DIFF``), with a layer subset of trainable weights (l. 43-48, ``create_optimizer``);
* UNDIAL: ``src/trainer/utils.py`` l. 70-99 (``compute_undial_loss``), averaged over answer tokens
  (open-unlearning averages over every position; the stated difference);
* IdkDPO: ``src/trainer/unlearn/dpo.py`` l. 12-33 with ``utils.py`` l. 34-67, plus the retain NLL;
* IdkNLL: locuslab/tofu ``dataloader.py``, ``loss_type == "idk"``: one ``outputs.loss`` over the
  concatenated IdK + retain batch;
* WGA / SatImp: ``utils.py`` l. 102-134 (``compute_wga_loss`` / ``compute_satimp_loss``) with
  GradDiff's retain NLL (``wga.py``, ``satimp.py``);
* CE-U: ``src/trainer/unlearn/ceu.py`` l. 7-81, its first answer tokens left out;
* PDU: ``src/trainer/unlearn/pdu.py`` l. 40-72 and 105-134: the dual variable moved after each step.

Step 2 is where the reference matters (at step 1 the model is its reference). Also: the scanned and
unrolled RMU steps are equal, and with LoRA the compiled step holds no second copy of the weights.
"""

from __future__ import annotations

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from flax import nnx
from tiny_models import write_tiny_llama_for

from sga_jax import config as C
from sga_jax import runner, train
from sga_jax.errors import ConfigError
from sga_jax.models.hf import hf_tensors

N_FORGET, N_RETAIN, BATCH, LR, LAYERS = 6, 8, 2, 2e-3, 3
IDK = ["I don't know.", "I have no idea about that.", "That is beyond what I can tell you."]
RMU_TRAINABLE = r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"
RTOL = 2e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("baselines")
    path, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny", num_hidden_layers=LAYERS)
    rows = {
        "forget.jsonl": [
            {
                "question": f"What is the secret code of agent {i}?",
                "answer": f"Agent {i} uses code {i * 37 + 11}.",
            }
            for i in range(N_FORGET)
        ],
        "retain.jsonl": [
            {
                "question": f"Who wrote the novel number {i}?",
                "answer": f"Novel {i} was written by author {i + 3}.",
            }
            for i in range(N_RETAIN)
        ],
        "idk.jsonl": [{"text": t} for t in IDK],
    }
    for name, rs in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root, path


def _overrides(root, model, method: list[str]) -> list[str]:
    return [
        "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"data.retain={root / 'retain.jsonl'}",
        f"model.path={model}", f"output_dir={root / 'unused'}", *method,
        "train.steps=2", f"train.batch_size={BATCH}", f"train.lr={LR}", "train.schedule=constant",
        "train.warmup_steps=0", "train.max_grad_norm=null", "train.progress=false",
    ]  # fmt: skip


# --------------------------------------------------------------- open-unlearning, in torch


def _tb(b) -> dict[str, torch.Tensor]:
    ids = torch.tensor(np.asarray(b["input_ids"]), dtype=torch.long)
    am = torch.tensor(np.asarray(b["attention_mask"]), dtype=torch.long)
    labels = torch.where(torch.tensor(np.asarray(b["loss_mask"])) > 0, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def _batch_nll(model, inputs) -> torch.Tensor:
    """open-unlearning utils.py l. 34-44 ``compute_batch_nll``: summed NLL per sequence."""
    logits = model(**inputs).logits[..., :-1, :]
    labels = inputs["labels"][..., 1:]
    return torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        logits.transpose(-1, -2), labels
    ).sum(-1)


def _dpo(model, ref, win, lose, beta):
    """utils.py l. 47-67 ``compute_dpo_loss``."""
    win_lr = -(_batch_nll(model, win) - _batch_nll(ref, win).detach())
    lose_lr = -(_batch_nll(model, lose) - _batch_nll(ref, lose).detach())
    return -2 / beta * F.logsigmoid(beta * (win_lr - lose_lr)).mean()


def _cached(model, inputs, layer) -> torch.Tensor:
    """rmu.py l. 83-98 ``forward_with_cache``: the output of ``model.layers[layer]``."""
    cache = []
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, i, o: cache.append(o[0] if isinstance(o, tuple) else o)
    )
    model(**inputs)
    handle.remove()
    return cache[0]


def _act_loss(a1, a2, mask):
    """rmu.py l. 108-117 ``compute_activation_loss``."""
    sq = F.mse_loss(a1, a2, reduction="none")
    s = (sq * mask.unsqueeze(-1).expand_as(sq)).mean(dim=2).sum(dim=1)
    return (s / mask.sum(dim=-1, keepdim=True)).mean()


def _torch_loss(m, model, ref, tb):
    f, r = tb["forget"], tb.get("retain")
    if m.name == "rmu":
        act_f = _cached(model, f, m.layer)
        # rmu.py l. 100-106: a U[0, 1) draw, normalised, times the steering coefficient (the draw is
        # jax's, the same seed; its normalisation and scale are re-derived here)
        u = torch.tensor(np.asarray(jax.random.uniform(jax.random.key(m.control_seed), (act_f.shape[-1],))))
        c = m.steering_coeff * u / torch.linalg.vector_norm(u)
        forget = _act_loss(act_f, c.expand_as(act_f), f["labels"] != -100)
        with torch.no_grad():
            ref_r = _cached(ref, r, m.layer)
        retain = _act_loss(_cached(model, r, m.layer), ref_r, r["labels"] != -100)
        return m.forget_weight * forget + m.retain_weight * retain
    if m.name == "undial":
        logits = model(**f).logits[..., :-1, :]
        with torch.no_grad():
            teacher = ref(**f).logits[..., :-1, :]
        labels = f["labels"][..., 1:]
        onehot = torch.zeros_like(teacher)
        onehot.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 1.0)
        soft = F.softmax(teacher - onehot * m.beta, dim=-1)
        ce = torch.nn.CrossEntropyLoss(reduction="none")(
            logits.reshape(-1, logits.shape[-1]), soft.reshape(-1, soft.shape[-1])
        )
        return m.forget_weight * ce[(labels != -100).reshape(-1)].mean()
    if m.name == "idk_dpo":
        forget = _dpo(model, ref, tb["idk"], f, m.beta)
        return m.forget_weight * forget + m.retain_weight * model(**r).loss
    if m.name == "idk_nll":  # one forward over the concatenated IdK + retain batch
        k = tb["idk"]
        t = max(k["input_ids"].shape[1], r["input_ids"].shape[1])
        pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        cat = {
            key: torch.cat([F.pad(b[key], (0, t - b[key].shape[1]), value=pad[key]) for b in (k, r)])
            for key in pad
        }
        return model(**cat).loss
    if m.name in ("wga", "satimp"):  # utils.py l. 102-134, wga.py / satimp.py: gamma·L_f + alpha·l_r
        logits = model(**f).logits[..., :-1, :]
        labels = f["labels"][..., 1:].reshape(-1)
        lm = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
            logits.reshape(-1, logits.shape[-1]), labels
        )
        p = (-lm).exp().detach()
        w = p**m.beta if m.name == "wga" else p**m.beta1 * (1 - p) ** m.beta2
        forget = -(w * lm)[labels != -100].mean()
        return m.forget_weight * forget + m.retain_weight * model(**r).loss
    if m.name == "ceu":  # ceu.py l. 7-81
        labels = f["labels"]
        valid = labels != -100
        first = (valid.cumsum(dim=-1) <= m.ignore_first_n_answer_tokens) & valid
        labels = labels.masked_fill(first, -100)[..., 1:]
        logits = model(**f).logits[..., :-1, :]
        keep = labels != -100
        z, y = logits[keep], labels[keep]
        target = z.detach().clone()
        target.scatter_(-1, y.unsqueeze(-1), float("-inf"))
        return F.cross_entropy(z, F.softmax(target, dim=-1))
    if m.name == "pdu":  # pdu.py l. 40-72 and 105-134, the dual held in ``PDU_DUAL`` across steps
        logits = model(**f).logits
        logits = logits.reshape(-1, logits.shape[-1])
        gap = (logits.max(dim=-1)[0] - logits.mean(dim=-1)) ** 2
        mask = (f["labels"] != -100).reshape(-1)
        forget = (gap * mask).sum() / mask.sum()
        retain = model(**r).loss - m.retain_loss_eps
        loss = torch.tensor([m.forget_weight, PDU_DUAL[0]]) @ torch.hstack([forget, retain])
        PDU_DUAL[0] = max(0, PDU_DUAL[0] + m.dual_step_size * retain.item())
        return loss
    raise AssertionError(m.name)


PDU_DUAL = [0.0]  # open-unlearning's ``self.preferences[1]``, the dual variable λ


# ----------------------------------------------------------------------------------- helpers


def _hf(graphdef, tree, rest) -> dict[str, np.ndarray]:
    """``tree`` (a params-shaped pytree) by HF parameter name, in HF layout."""
    model = nnx.merge(graphdef, tree, rest)
    out = {}
    for name, value, transpose, i in hf_tensors(model):
        v = np.asarray(value[i] if i is not None else value, np.float64)
        out[name] = v.T if transpose else v
    return out


def _adam_mu(opt_state):
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]  # fmt: skip
    assert len(states) == 1
    return states[0].mu


def _close(got: dict, want: dict, what: str, rtol: float = RTOL) -> float:
    """max |got - want| / max |want| over the names of ``want``; asserted <= ``rtol``."""
    scale = max(float(np.abs(v).max()) for v in want.values())
    errs = {k: float(np.abs(got[k] - v).max()) for k, v in want.items()}
    worst = max(errs, key=errs.get)
    err = errs[worst]
    assert scale > 0, what
    assert err <= rtol * scale, f"{what}: max |jax - torch| = {err:.3g} ({worst}), max |torch| = {scale:.3g}"
    return err / scale


def _trainable(m, name: str) -> bool:
    patterns = getattr(m, "trainable", [".*"])
    return any(re.fullmatch(p, name) for p in patterns)


def _two_steps(cfg, prep):
    """Two runner steps and two torch steps; returns the relative errors seen."""
    m, t_cfg = cfg.method, cfg.train
    method, tx, _, (graphdef, params, rest), ref = train.method_setup(prep.model, cfg, 2)
    opt_state = tx.init(params)
    step = train.make_step(graphdef, rest, method, tx, ref=ref, donate=False)
    tm = __import__("transformers").AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    # nn.Embedding(padding_idx=pad) zeroes the pad row's gradient, here a real token (<|im_end|>)
    # that sga_jax trains like any other: a model-level difference, not the method's; off here.
    tm.model.embed_tokens.padding_idx = None
    tref = copy.deepcopy(tm).eval()
    for p in tref.parameters():
        p.requires_grad_(False)
    named = dict(tm.named_parameters())
    trained = [p for n, p in named.items() if _trainable(m, n)]  # rmu.py l. 43-48: the optimizer's
    opt = torch.optim.AdamW(
        trained, lr=LR, betas=(t_cfg.b1, t_cfg.b2), eps=1e-8, weight_decay=t_cfg.weight_decay
    )
    mu_prev, errs = None, {}
    PDU_DUAL[0] = getattr(m, "retain_weight", 0.0)
    for s in range(2):
        host = jax.tree.map(lambda x: x[0], train.step_batch(prep.data, s, BATCH, 1, t_cfg.seed))
        params, opt_state, got = step(params, opt_state, jax.tree.map(lambda x: jnp.asarray(x)[None], host))
        mu = _adam_mu(opt_state)
        d = mu if mu_prev is None else jax.tree.map(lambda a, b: a - t_cfg.b1 * b, mu, mu_prev)
        mu_prev = mu
        grads = _hf(graphdef, jax.tree.map(lambda x: x / (1 - t_cfg.b1), d), rest)
        tm.zero_grad()  # every gradient (the optimizer holds only the trained ones)
        loss = _torch_loss(m, tm, tref, {k: _tb(v) for k, v in host.items() if isinstance(v, dict)})
        loss.backward()
        opt.step()
        if m.name == "pdu":  # the loss's λ is the transform's (reported as ``dual``)
            lam, l_r = got["dual"], got["retain_loss"]
            ours = m.forget_weight * got["forget_loss"] + lam * (l_r - m.retain_loss_eps)
            assert float(got["dual_next"]) == pytest.approx(PDU_DUAL[0], rel=RTOL), f"pdu step {s + 1}: λ"
        else:
            ours = got["loss"]
        want = float(loss.detach())
        assert float(ours) == pytest.approx(want, rel=RTOL, abs=1e-6), f"{m.name} step {s + 1}: loss"
        want_g = {n: p.grad.double().numpy() for n, p in named.items() if p.grad is not None}
        errs[f"grad{s + 1}"] = _close(grads, want_g, f"{m.name} step {s + 1}: gradient")
        new = _hf(graphdef, params, rest)
        # UNDIAL's gradients on a random model are ~1e-7 an entry (p_target ~ 1/V), near Adam's
        # eps = 1e-8, where Adam's normalisation amplifies float noise of the step-1 parameters.
        rtol = 5e-3 if m.name == "undial" and s == 1 else RTOL
        errs[f"params{s + 1}"] = _close(new, {n: p.detach().double().numpy() for n, p in named.items()},
                                        f"{m.name} step {s + 1}: parameters", rtol)  # fmt: skip
        frozen = [n for n in named if not _trainable(m, n)]
        start = dict(tref.named_parameters())
        for n in frozen:  # the mask: what the method does not train never moves
            np.testing.assert_array_equal(new[n], start[n].double().numpy(), err_msg=n)
    return errs


CASES = {
    "rmu": [
        "method=rmu",
        "method.layer=1",
        f"method.trainable=[{RMU_TRAINABLE}]",
        "method.steering_coeff=6.0",
    ],
    "rmu_all": ["method=rmu", "method.layer=1"],
    "undial": ["method=undial"],
    "idk_dpo": ["method=idk_dpo"],
    "idk_nll": ["method=idk_nll"],
    # small betas: on a random model p ~ 1/V, and p^beta at the default betas all but zeroes the
    # forget term (a test of the retain NLL only); a small retain weight lets the forget term lead
    "wga": ["method=wga", "method.beta=0.1", "method.retain_weight=0.1"],
    "satimp": [
        "method=satimp",
        "method.beta1=0.1",
        "method.beta2=2.0",
        "method.forget_weight=1.0",
        "method.retain_weight=0.1",
    ],
    "ceu": ["method=ceu", "method.ignore_first_n_answer_tokens=2"],
    # the dual moves from step 1 on (no warm-up), so step 2 uses the λ it moved to
    "pdu": [
        "method=pdu",
        "method.dual_warmup_epochs=0",
        "method.dual_step_size=0.05",
        "method.retain_weight=2.0",
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_method_step_against_torch(name, setup, smollm2_tokenizer):
    root, model_path = setup
    over = _overrides(root, model_path, CASES[name])
    if name.startswith("idk"):
        over.append(f"method.idk={root / 'idk.jsonl'}")
    cfg = C.compose([], over)
    prep = runner.prepare(cfg)
    if name.startswith("idk"):  # the IdK rows: a file answer under each forget row's own question
        for i in range(N_FORGET):
            ids, lm = prep.data.idk["input_ids"][i], prep.data.idk["loss_mask"][i]
            assert smollm2_tokenizer.decode(ids[lm > 0]).strip().removesuffix("<|im_end|>").strip() in IDK
    errs = _two_steps(cfg, prep)
    print(name, {k: f"{v:.2e}" for k, v in errs.items()})


def _rmu_step(setup, scan: bool, extra=()):
    root, model_path = setup
    over = [*_overrides(root, model_path, CASES["rmu"]), f"model.scan_layers={str(scan).lower()}", *extra]
    cfg = C.compose([], over)
    prep = runner.prepare(cfg)
    method, tx, _, (graphdef, params, rest), ref = train.method_setup(prep.model, cfg, 2)
    opt_state = tx.init(params)
    step = train.make_step(graphdef, rest, method, tx, ref=ref, donate=False)
    out = []
    for s in range(2):
        batch = jax.tree.map(jnp.asarray, train.step_batch(prep.data, s, BATCH, 1, cfg.train.seed))
        params, opt_state, got = step(params, opt_state, batch)
        out.append((float(got["loss"]), _hf(graphdef, params, rest)))
    return out


def test_rmu_scanned_equals_unrolled(setup):
    """The reference, the layer activations and the layer-index mask (a mask over the stacked axis
    when scanned) give the same two steps under scan_layers and unrolled."""
    unrolled, scanned = _rmu_step(setup, False), _rmu_step(setup, True)
    for (l_u, p_u), (l_s, p_s) in zip(unrolled, scanned):
        assert l_s == pytest.approx(l_u, rel=1e-5)
        assert set(p_u) == set(p_s)
        _close(p_s, p_u, "scanned vs unrolled parameters")
    moved = {n for n in unrolled[1][1] if not np.array_equal(unrolled[1][1][n], scanned[0][1][n])}
    assert moved, "nothing trained"


def test_lora_reference_holds_no_second_copy(setup):
    """With LoRA the reference is the base with adapters off: the compiled step's arguments are the
    adapters, their Adam state, the frozen base and the batch — no second copy of any weight."""
    root, model_path = setup
    over = [*_overrides(root, model_path, ["method=idk_dpo", f"method.idk={root / 'idk.jsonl'}"]),
            "model.lora.rank=4"]  # fmt: skip
    cfg = C.compose([], over)
    prep = runner.prepare(cfg)
    method, tx, _, (graphdef, params, rest), ref = train.method_setup(prep.model, cfg, 2)
    assert ref is None and method.reference
    opt_state = tx.init(params)
    batch = jax.tree.map(jnp.asarray, train.step_batch(prep.data, 0, BATCH, 1, cfg.train.seed))
    jitted = train.make_step(graphdef, None, method, tx, bind_rest=False)
    compiled = jitted.lower(params, opt_state, rest, batch, ref).compile()
    nbytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state, rest, batch)))
    base = sum(x.nbytes for x in jax.tree.leaves(rest))
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args <= nbytes + 1024, (args, nbytes)  # exactly the arguments: no reference copy
    assert args < base + base // 2  # one copy of the weights, not two
    # the same method on the full model holds one copy of the trainable parameters as its reference
    full = C.compose([], over[:-1])
    method_f, _, _, (_, params_f, _), ref_f = train.method_setup(runner.prepare(full).model, full, 2)
    assert sum(x.nbytes for x in jax.tree.leaves(ref_f)) == sum(x.nbytes for x in jax.tree.leaves(params_f))


def test_rmu_with_lora_trains_the_adapters_only(setup):
    """RMU's default ``method.trainable`` (every weight) restricts nothing under LoRA: its step runs
    on the adapters, with the base (adapters off) as the frozen reference, and the base stays put.
    A narrower selection of base weights is refused: it cannot apply to adapters."""
    root, model_path = setup
    over = [*_overrides(root, model_path, CASES["rmu_all"]), "model.lora.rank=4"]
    cfg = C.compose([], over)
    prep = runner.prepare(cfg)
    method, tx, _, (graphdef, params, rest), ref = train.method_setup(prep.model, cfg, 2)
    assert ref is None and method.reference and method.trainable == (".*",)
    base = [np.asarray(x) for x in jax.tree.leaves(rest)]
    start = [np.asarray(x) for x in jax.tree.leaves(params)]
    step = train.make_step(graphdef, rest, method, tx, ref=ref, donate=False)
    opt_state = tx.init(params)
    for s in range(2):
        batch = jax.tree.map(jnp.asarray, train.step_batch(prep.data, s, BATCH, 1, cfg.train.seed))
        params, opt_state, got = step(params, opt_state, batch)
        assert np.isfinite(float(got["loss"]))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(start, jax.tree.leaves(params)))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(base, jax.tree.leaves(rest)))
    narrow = C.compose([], [*_overrides(root, model_path, CASES["rmu"]), "model.lora.rank=4"])
    with pytest.raises(ConfigError, match="does not apply with model.lora"):
        train.method_setup(runner.prepare(narrow).model, narrow, 2)
