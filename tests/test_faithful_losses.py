"""The runner's NPO / SimNPO / GA / GradDiff losses against open-unlearning's formulas, written out
here in PyTorch on the same tiny HF Llama (issue 13, items 1, 2 and 8).

References (locuslab/open-unlearning):
* ``src/trainer/utils.py`` l. 34-44 ``compute_batch_nll``: cross-entropy with ``ignore_index=-100``,
  ``reduction="none"``, **summed** over each sequence; l. 47-67 ``compute_dpo_loss``:
  ``-2/β · logsigmoid(β·(win_log_ratio - lose_log_ratio)).mean()`` with
  ``lose_log_ratio = -(nll - ref_nll)`` and no winner.
* ``src/trainer/unlearn/npo.py`` l. 15-31: ``gamma·forget_loss + alpha·retain_loss``, the retain loss
  being HF's ``outputs.loss`` (token average over the batch); ``configs/trainer/NPO.yaml``: β 0.1.
* ``src/trainer/unlearn/simnpo.py`` l. 16-30: ``nll_sum / loss_mask.sum(-1) - delta`` inside
  ``-logsigmoid(β·…).mean()·2/β``, then ``gamma·forget + alpha·retain``; ``configs/trainer/SimNPO.yaml``:
  delta 0.0, beta 4.5, alpha 1.0, gamma 0.125.
* ``src/trainer/unlearn/grad_ascent.py`` l. 12-13, ``grad_diff.py`` l. 49-60: ``-outputs.loss`` and
  ``gamma·(-forget outputs.loss) + alpha·retain outputs.loss``.
The torch side uses transformers' own ``outputs.loss`` wherever open-unlearning does.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax import config as C
from sga_jax import logprobs, methods

T, V = 14, 96


def _batch(rng, rows, prompt=4):
    ids = rng.integers(3, V, size=(rows, T)).astype(np.int32)
    attn = np.ones((rows, T), np.int32)
    for i in range(rows):
        n = T - 3 * (i % 3)  # right padding 0, 3, 6: rows of different answer lengths
        attn[i, n:] = 0
        ids[i, n:] = 0
    loss = attn.copy()
    loss[:, :prompt] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("faithful")
    path_ref, torch_ref = write_tiny_hf("llama", root / "start", seed=5)
    path_cur, torch_cur = write_tiny_hf("llama", root / "current", seed=6)
    with torch.no_grad():  # sharper logits: rows get clearly different NLLs (reductions differ)
        for p in torch_cur.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    torch_cur.save_pretrained(path_cur, safe_serialization=True)
    rng = np.random.default_rng(0)
    batch = {"forget": _batch(rng, 3), "retain": _batch(rng, 3)}
    return dict(
        jax_ref=sga_jax.load_model(path_ref),
        jax_cur=sga_jax.load_model(path_cur),
        torch_ref=torch_ref,
        torch_cur=torch_cur,
        batch=batch,
    )


# ------------------------------------------------------------- open-unlearning, written in torch


def _labels(b):
    ids = torch.as_tensor(b["input_ids"], dtype=torch.long)
    labels = ids.clone()
    labels[torch.as_tensor(b["loss_mask"]) == 0] = -100
    return ids, labels


def ou_batch_nll(model, b):
    """compute_batch_nll: summed cross-entropy per sequence (ignore_index=-100)."""
    ids, labels = _labels(b)
    logits = model(ids, attention_mask=torch.as_tensor(b["attention_mask"])).logits
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return ce(logits[..., :-1, :].transpose(-1, -2), labels[..., 1:]).sum(dim=-1)


def hf_loss(model, b):
    """transformers' own outputs.loss: token-average cross-entropy over the batch."""
    ids, labels = _labels(b)
    return model(ids, attention_mask=torch.as_tensor(b["attention_mask"]), labels=labels).loss


def ou_npo(model, ref_model, b, beta=0.1, alpha=1.0, gamma=1.0):
    lose = ou_batch_nll(model, b["forget"])
    with torch.no_grad():
        lose_ref = ou_batch_nll(ref_model, b["forget"])
    lose_log_ratio = -(lose - lose_ref)
    forget = -2 / beta * F.logsigmoid(beta * (0.0 - lose_log_ratio)).mean()
    return gamma * forget + alpha * hf_loss(model, b["retain"])


def ou_simnpo(model, b, delta=0.0, beta=4.5, alpha=1.0, gamma=0.125):
    labels_mask = torch.as_tensor(b["forget"]["loss_mask"]) != 0
    loss = ou_batch_nll(model, b["forget"]) / labels_mask.sum(-1) - delta
    forget = -F.logsigmoid(beta * loss).mean() * 2 / beta
    return gamma * forget + alpha * hf_loss(model, b["retain"])


# ------------------------------------------------------------------------------------ the runner


def _runner_loss(method_cfg, model, batch, ref_model=None):
    m = methods.build_method(method_cfg)
    batch = {k: {kk: jnp.asarray(vv) for kk, vv in v.items()} for k, v in batch.items()}
    if "ref_nll" in m.needs:
        # as train.prepare does: the starting model's summed forget NLLs
        batch["ref_nll"] = jnp.asarray(logprobs.batched_nll(ref_model, batch["forget"], reduction="sum"))
    loss, _ = m.loss(model, batch)
    return float(loss)


def test_npo_runner_matches_open_unlearning(models):
    s = models
    cfg = C.compose([], ["method=npo"]).method
    ours = _runner_loss(cfg, s["jax_cur"], s["batch"], ref_model=s["jax_ref"])
    with torch.no_grad():
        ref = float(ou_npo(s["torch_cur"], s["torch_ref"], s["batch"]))
    assert ours == pytest.approx(ref, rel=2e-5)
    # The per-token form (the bug) gives a clearly different loss on these models.
    with torch.no_grad():
        n = torch.as_tensor(s["batch"]["forget"]["loss_mask"][:, 1:].sum(-1), dtype=torch.float32)
        per_tok = ou_batch_nll(s["torch_cur"], s["batch"]["forget"]) / n
        per_tok_ref = ou_batch_nll(s["torch_ref"], s["batch"]["forget"]) / n
        wrong = float(
            -2 / 0.1 * F.logsigmoid(0.1 * (per_tok - per_tok_ref)).mean()
            + hf_loss(s["torch_cur"], s["batch"]["retain"])
        )
    assert abs(wrong - ref) > 1e-3


@pytest.mark.parametrize("margin", ["zero", "near_nll"])
def test_simnpo_runner_matches_open_unlearning_defaults(models, margin):
    s = models
    with torch.no_grad():
        n = torch.as_tensor(s["batch"]["forget"]["loss_mask"][:, 1:].sum(-1), dtype=torch.float32)
        mean_nll = float((ou_batch_nll(s["torch_cur"], s["batch"]["forget"]) / n).mean())
    # "near_nll": a margin where σ(β·(l̄ - γ)) is far from saturated, so the forget term matters.
    gamma = 0.0 if margin == "zero" else round(mean_nll, 3)
    cfg = C.compose([], ["method=simnpo", f"method.gamma={gamma}"]).method
    assert (cfg.beta, cfg.forget_weight, cfg.retain_weight) == (4.5, 0.125, 1.0)  # SimNPO.yaml
    ours = _runner_loss(cfg, s["jax_cur"], s["batch"])
    with torch.no_grad():
        ref = float(ou_simnpo(s["torch_cur"], s["batch"], delta=gamma))  # our gamma = its delta
        if margin == "near_nll":  # the old mapping (weight 1 on the forget term) is far off here
            assert abs(float(ou_simnpo(s["torch_cur"], s["batch"], delta=gamma, gamma=1.0)) - ref) > 1e-2
    assert ours == pytest.approx(ref, rel=2e-5)


def test_ga_and_graddiff_token_reduction_is_hf_loss(models):
    s = models
    b = s["batch"]
    with torch.no_grad():
        f_tok = float(hf_loss(s["torch_cur"], b["forget"]))
        r_tok = float(hf_loss(s["torch_cur"], b["retain"]))
        # "sequence": the mean over rows of per-row token means
        n = torch.as_tensor(b["forget"]["loss_mask"][:, 1:].sum(-1), dtype=torch.float32)
        f_seq = float((ou_batch_nll(s["torch_cur"], b["forget"]) / n).mean())
    ga = C.compose([], ["method=ga"]).method
    assert ga.loss_reduction == "token"
    assert _runner_loss(ga, s["jax_cur"], b) == pytest.approx(-f_tok, rel=2e-5)
    gd = C.compose([], ["method=graddiff", "method.retain_weight=0.7"]).method
    assert _runner_loss(gd, s["jax_cur"], b) == pytest.approx(-f_tok + 0.7 * r_tok, rel=2e-5)
    ga_seq = C.compose([], ["method=ga", "method.loss_reduction=sequence"]).method
    assert _runner_loss(ga_seq, s["jax_cur"], b) == pytest.approx(-f_seq, rel=2e-5)
    assert abs(f_seq - f_tok) > 1e-4  # rows of different lengths: the two reductions differ


def test_config_errors_name_the_keys():
    with pytest.raises(sga_jax.errors.ConfigError, match="method.loss_reduction"):
        C.compose([], ["method=ga", "method.loss_reduction=batch"])
    with pytest.raises(sga_jax.errors.ConfigError, match="delta"):
        C.compose([], ["method=simnpo", "method.delta=0.1"])  # renamed: gamma is the margin now
