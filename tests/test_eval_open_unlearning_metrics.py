"""open-unlearning's metrics (locuslab/open-unlearning at d3d7cf9): extraction strength, exact
memorization, the gradnorm and reference MIAs, and the ``prob_mean`` truth ratio, each against a
re-derivation of open-unlearning's code written here in torch / numpy (``src/evals/metrics/
memorization.py``, ``utils.py``, ``mia/gradnorm.py``, ``mia/reference.py``, ``mia/utils.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.data import tofu
from sga_jax.data.formatting import Encoded, PromptFormatter
from sga_jax.errors import ConfigError
from sga_jax.eval import memorization as mem
from sga_jax.eval import mia
from sga_jax.eval import tofu as tofu_eval

IGNORE = -100  # open-unlearning's IGNORE_INDEX
BOS, EOS, PAD = 1, 2, 0  # the tiny Llama's special tokens (tests/tiny_models.py)


# ------------------------------------------------------------------ the re-derivations (torch)


def ou_es(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """_extraction_strength's loop: the first k whose suffixes agree, 1 - k/n (0 for n = 0)."""
    n = len(labels)
    k = 0
    for k in range(n):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 0.0 if n == 0 else 1 - k / n


def ou_em(preds: torch.Tensor, labels: torch.Tensor) -> float | None:
    n = len(labels)
    return None if n == 0 else ((preds == labels).sum() / n).item()


def torch_batch(seqs: list[tuple[list[int], list[int]]]):
    """Right-padded ``input_ids, attention_mask, labels`` (IGNORE off the loss mask), as their collator."""
    t = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    att = torch.zeros((len(seqs), t), dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    for b, (x, m) in enumerate(seqs):
        ids[b, : len(x)] = torch.tensor(x)
        att[b, : len(x)] = 1
        labels[b, : len(x)] = torch.tensor([tok if on else IGNORE for tok, on in zip(x, m)])
    return ids, att, labels


def ou_vocab_logprobs(model, ids, att, labels):
    """tokenwise_vocab_logprobs: per row the [N, V] log-probs over the labelled tokens but the last."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits, dim=-1)[:, :-1]
    out = []
    for i in range(ids.shape[0]):
        pos = (labels[i] != IGNORE).nonzero(as_tuple=True)[0][:-1]
        if len(pos) == 0:
            out.append((torch.zeros(0, lp.shape[-1]), torch.tensor([], dtype=torch.long)))
            continue
        out.append((lp[i, pos[0].item() - 1 : pos[-1].item()], labels[i][pos]))
    return out


def ou_gradnorm(model, ids, labels, p) -> float:
    """GradNormAttack.compute_batch_values for a batch of one row."""
    model.train()
    lp = torch.log_softmax(model(input_ids=ids).logits, dim=-1)[:, :-1]
    target = torch.gather(lp, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    pos = (labels[0] != IGNORE).nonzero(as_tuple=True)[0][:-1]
    loss = -torch.mean(target[0, pos[0].item() - 1 : pos[-1].item()])
    model.zero_grad()
    loss.backward()
    norms = [q.grad.detach().norm(p=p) for q in model.parameters() if q.grad is not None]
    model.eval()
    return torch.stack(norms).mean().item()


def ou_avg_loss(model, ids, att, labels) -> np.ndarray:
    """evaluate_probability's avg_loss: summed CE over the shifted labels / number of labels."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE, reduction="none")
    losses = ce(logits.transpose(-1, -2), labels[:, 1:]).sum(-1)
    return (losses / (labels != IGNORE).sum(-1)).numpy()


def ou_truth_ratio(correct_avg_loss, wrong_avg_losses, aggregator: str) -> float:
    """truth_ratio of memorization.py for one aggregator (aggregate_to_1D = mean over extra axes)."""
    c = np.exp(-np.asarray(correct_avg_loss, np.float64))
    w = np.exp(-np.asarray(wrong_avg_losses, np.float64).mean(axis=1))
    if aggregator == "prob_mean":
        return float(np.mean(c / (c + w + 1e-10)))
    tr = w / (c + 1e-10)
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(tr, 1 / (tr + 1e-10))))
    return float(np.mean(np.maximum(0, 1 - tr)))


# ------------------------------------------------------------------ pure functions


CASES = [
    ([5, 6, 7, 8], [5, 6, 7, 8]),  # all right: ES 1, EM 1
    ([9, 6, 7, 8], [5, 6, 7, 8]),  # first wrong: ES 3/4
    ([5, 9, 7, 8, 3], [5, 6, 7, 8, 3]),  # a wrong token inside: ES 3/5, EM 4/5
    ([5, 6, 7, 9], [5, 6, 7, 8]),  # last wrong: the loop stops at k = n-1, ES 1/4 (not 0)
    ([1, 1, 1], [2, 2, 2]),  # none right: ES 1/3, EM 0
    ([4], [4]),
    ([], []),  # no answer token: ES 0, EM None
]


@pytest.mark.parametrize("preds,labels", CASES)
def test_es_em_by_hand_vs_open_unlearning(preds, labels):
    p, y = torch.tensor(preds, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
    assert mem.extraction_strength(np.array(preds), np.array(labels)) == pytest.approx(ou_es(p, y))
    want = ou_em(p, y)
    got = mem.exact_memorization(np.array(preds), np.array(labels))
    assert got == (None if want is None else pytest.approx(want))


def test_es_em_hand_values():
    es = [mem.extraction_strength(np.array(p), np.array(y)) for p, y in CASES]
    assert es == pytest.approx([1, 3 / 4, 3 / 5, 1 / 4, 1 / 3, 1, 0])
    assert mem.exact_memorization(np.array([5, 9, 7, 8, 3]), np.array([5, 6, 7, 8, 3])) == 0.8
    scores = {
        "extraction_strength": np.array([1.0, 0.5, 0.0]),
        "exact_memorization": np.array([1, np.nan, 0.5]),
    }
    assert mem.mean_scores(scores) == {"extraction_strength": 0.5, "exact_memorization": 0.75}
    none = {"extraction_strength": np.array([0.0]), "exact_memorization": np.array([np.nan])}
    assert mem.mean_scores(none) == {"extraction_strength": 0.0, "exact_memorization": None}


def test_mean_param_norm_by_hand_vs_torch():
    import jax.numpy as jnp

    tree = {"a": jnp.array([[3.0, 4.0]]), "b": {"c": jnp.array([1.0, -2.0, 2.0])}}
    want = {2: (5 + 3) / 2, 1: (7 + 5) / 2, float("inf"): (4 + 2) / 2}
    for p, value in want.items():
        ref = torch.stack([torch.tensor(np.asarray(x)).norm(p=p) for x in (tree["a"], tree["b"]["c"])]).mean()
        assert float(mia.mean_param_norm(tree, p)) == pytest.approx(value) == pytest.approx(ref.item())
    with pytest.raises(ConfigError):
        mia.mean_param_norm(tree, 3)


def test_reference_score_sign():
    # open-unlearning: target_loss - ref_loss, members labelled 0; here negated, members higher
    assert mia.reference_score(nll=1.0, reference_nll=3.0) == 2.0


# ------------------------------------------------------------------ on a tiny random model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, torch_model = write_tiny_hf("llama", tmp_path_factory.mktemp("ou") / "llama")
    torch_model.eval()
    return path, sga_jax.load_model(path), torch_model


def _greedy(torch_model, ids: list[int]) -> int:
    with torch.no_grad():
        return int(torch_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())


def _memorized_rows(torch_model) -> list[Encoded]:
    """Prompt + answer + EOS rows whose answer tokens are the model's own greedy next token ("g") or
    a random one ("r"): ES and EM take values other than a random model's 1/n and 0."""
    rng = np.random.default_rng(0)
    rows = []
    for pattern in ("gggggg", "rrgggg", "gggrggg", "rrrrr", "grgrgggg", "g", ""):
        ids = [BOS, *rng.integers(3, 96, size=int(rng.integers(3, 7))).tolist()]
        n_prompt = len(ids)
        for c in pattern:
            ids.append(_greedy(torch_model, ids) if c == "g" else int(rng.integers(3, 96)))
        ids.append(EOS)
        rows.append(Encoded(ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)))
    return rows


def test_memorization_scores_vs_open_unlearning(tiny):
    _, model, torch_model = tiny
    rows = _memorized_rows(torch_model)
    got = mem.memorization_scores(model, rows, pad_id=PAD, batch_size=4)
    ids, att, labels = torch_batch([(r.input_ids, r.loss_mask) for r in rows])
    want_es, want_em = [], []
    for log_probs, y in ou_vocab_logprobs(torch_model, ids, att, labels):
        preds = torch.argmax(log_probs, dim=-1)
        want_es.append(ou_es(preds, y))
        em = ou_em(preds, y)
        want_em.append(np.nan if em is None else em)
    np.testing.assert_allclose(got["extraction_strength"], want_es, rtol=1e-12)
    np.testing.assert_allclose(got["exact_memorization"], want_em, rtol=1e-6)  # torch divides in float32
    assert want_es[0] == 1.0 and want_es[1] == pytest.approx(4 / 6) and want_es[-1] == 0.0
    assert np.isnan(want_em[-1]) and 0 < want_em[2] < 1  # the test rows exercise every branch


@pytest.mark.parametrize("p", [1, 2, float("inf")])
def test_gradnorm_vs_open_unlearning(tiny, p):
    """Text rows (no EOS) here; open-unlearning's rows end in EOS, which tokenwise_logprobs drops."""
    _, model, torch_model = tiny
    rng = np.random.default_rng(1)
    texts = [[BOS, *rng.integers(3, 96, size=int(n)).tolist()] for n in (5, 9, 7, 12, 6, 8)]
    rows = [Encoded(t, [0] + [1] * (len(t) - 1)) for t in texts]
    got = mia.gradnorm_scores(model, rows, pad_id=PAD, p=p)
    want = []
    for t in texts:
        ids, _, labels = torch_batch([(t + [EOS], [0] + [1] * len(t))])
        want.append(ou_gradnorm(torch_model, ids, labels, p))
    np.testing.assert_allclose(-got, want, rtol=2e-4)
    # AUC: open-unlearning labels the forget (member) rows 0 and scores the positive norm
    ou_auc = roc_auc_score([0, 0, 0, 1, 1, 1], want)
    assert mia.auc(got[:3], got[3:]) == pytest.approx(ou_auc)


def test_reference_vs_open_unlearning(tiny, tmp_path):
    path, model, torch_model = tiny
    ref_path, ref_torch = write_tiny_hf("llama", tmp_path / "ref", seed=1)
    ref_torch.eval()
    rows = _memorized_rows(torch_model)[:6]  # every row with at least one answer token
    got = mia.reference_scores(model, sga_jax.load_model(ref_path), rows, pad_id=PAD, batch_size=4)
    batch = torch_batch([(r.input_ids, r.loss_mask) for r in rows])
    want = ou_avg_loss(torch_model, *batch) - ou_avg_loss(ref_torch, *batch)  # target - ref
    np.testing.assert_allclose(-got, want, rtol=1e-4, atol=1e-5)
    ou_auc = roc_auc_score([0, 0, 0, 1, 1, 1], want)
    assert mia.auc(got[:3], got[3:]) == pytest.approx(ou_auc)


# ------------------------------------------------------------------ TOFU


@pytest.mark.parametrize("model", ["phi-1.5_full", "phi-1.5_retain90"])
def test_truth_ratio_prob_mean_vs_open_unlearning(data_dir, model):
    folder = data_dir / "tofu_eval_logs" / model
    ours = tofu_eval.aggregate(folder)
    for name, split in tofu_eval.FILES.items():
        log = json.loads((folder / name).read_text())
        correct = list(log["avg_paraphrased_loss"].values())
        wrong = list(log["average_perturb_loss"].values())
        want = ou_truth_ratio(correct, wrong, "prob_mean")
        assert ours[f"{split}_truth_ratio_prob_mean"] == pytest.approx(want, rel=1e-12), split
        # TOFU's own truth ratio is open-unlearning's other two aggregators (up to their 1e-10)
        other = "closer_to_1_better" if split == "forget" else "true_better"
        assert ours[f"{split}_truth_ratio"] == pytest.approx(ou_truth_ratio(correct, wrong, other), rel=1e-8)
    assert ours["forget_truth_ratio_prob_mean"] != ours["retain_truth_ratio_prob_mean"]


def test_tofu_forget_memorization_vs_open_unlearning(tmp_path, smollm2_tokenizer):
    """The TOFU wiring on a tiny random Llama over SmolLM2's vocabulary, against the plain-template
    QA rows ("Question: q\\nAnswer: a" + EOS, labels on the answer and EOS) scored by the reference."""
    tok = smollm2_tokenizer
    path, torch_model = write_tiny_hf(
        "llama", tmp_path / "m", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=512,
    )  # fmt: skip
    torch_model.eval()
    fmt = PromptFormatter(tok, "plain", max_length=200)
    got = tofu_eval.forget_memorization(sga_jax.load_model(path), tok, limit=3, formatter=fmt, batch_size=2)
    seqs = []
    for row in tofu.load_tofu("forget10_perturbed", limit=3):
        q = "Question: " + row["question"] + "\n"
        ids = tok(q + "Answer: " + row["answer"], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
        n_q = len(tok(q, add_special_tokens=True)["input_ids"])
        seqs.append((ids, [0] * n_q + [1] * (len(ids) - n_q)))
    es, em = [], []
    for log_probs, y in ou_vocab_logprobs(torch_model, *torch_batch_pad(seqs, tok.pad_token_id)):
        preds = torch.argmax(log_probs, dim=-1)
        es.append(ou_es(preds, y))
        em.append(ou_em(preds, y))
    assert got["forget_extraction_strength"] == pytest.approx(np.mean(es), rel=1e-12)
    assert got["forget_exact_memorization"] == pytest.approx(np.mean(em), rel=1e-6)


def torch_batch_pad(seqs, pad_id):
    ids, att, labels = torch_batch(seqs)
    ids[att == 0] = pad_id
    return ids, att, labels


# ------------------------------------------------------------------ MUSE


def test_muse_memorization_vs_open_unlearning(tmp_path, smollm2_tokenizer):
    """MUSE verbmem rows encoded and scored as open-unlearning's CompletionDataset
    (preprocess_pretraining_instance, insert_space, max_length on the gt) + tokenwise_vocab_logprobs."""
    from sga_jax.data import muse as muse_data
    from sga_jax.eval import muse

    tok = smollm2_tokenizer
    path, torch_model = write_tiny_hf(
        "llama", tmp_path / "m", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=2048,
    )  # fmt: skip
    torch_model.eval()
    got = muse.memorization(sga_jax.load_model(path), tok, limit=2, max_length=24, batch_size=2)
    seqs = []
    for row in muse_data.load_verbmem(limit=2):
        full = tok(row["prompt"] + " " + row["gt"], add_special_tokens=True)["input_ids"]
        n_prefix = len(tok(row["prompt"], add_special_tokens=True)["input_ids"])
        full = full[: n_prefix + 24]
        start = max(n_prefix, 1)
        seqs.append((full, [0] * start + [1] * (len(full) - start)))
    es, em = [], []
    for log_probs, y in ou_vocab_logprobs(torch_model, *torch_batch_pad(seqs, tok.pad_token_id)):
        preds = torch.argmax(log_probs, dim=-1)
        es.append(ou_es(preds, y))
        em.append(ou_em(preds, y))
    assert len(es) == 2 and all(len(s[0]) - s[1].count(0) == 24 for s in seqs)  # the gt was cut at 24
    assert got["extraction_strength"] == pytest.approx(np.mean(es), rel=1e-12)
    assert got["exact_memorization"] == pytest.approx(np.mean(em), rel=1e-6)
    assert [x["extraction_strength"] for x in got["logs"]] == pytest.approx(es, rel=1e-12)


# ------------------------------------------------------------------ the mia benchmark's options


def test_mia_benchmark_gradnorm_and_reference_vs_open_unlearning(tmp_path, smollm2_tokenizer):
    """``evaluate("mia", gradnorm_p=2, reference_model=...)``: the two AUCs as open-unlearning's
    mia_auc (forget = members labelled 0) over its GradNormAttack / ReferenceAttack scores."""
    from sga_jax.eval.options import check_options
    from sga_jax.eval.run import evaluate

    tok = smollm2_tokenizer
    cfg = dict(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    )  # fmt: skip
    path, torch_model = write_tiny_hf("llama", tmp_path / "m", **cfg)
    ref_path, ref_torch = write_tiny_hf("llama", tmp_path / "ref", seed=1, **cfg)
    texts = {
        "members": ["The cat sat on the mat.", "Paris is in France.", "One two three four five."],
        "nonmembers": ["A dog ran far away.", "Rome is in Italy, they say.", "Six seven eight."],
    }
    for name, rows in texts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    res = evaluate(
        "mia", path, tmp_path / "out", tokenizer=tok, members=str(tmp_path / "members.jsonl"),
        nonmembers=str(tmp_path / "nonmembers.jsonl"), gradnorm_p=2, reference_model=str(ref_path),
    )  # fmt: skip
    grad, gap = [], []
    for t in texts["members"] + texts["nonmembers"]:
        ids = tok(t, add_special_tokens=True)["input_ids"]
        labels = [IGNORE, *ids[1:]]
        x, y = torch.tensor([ids + [tok.eos_token_id]]), torch.tensor([labels + [tok.eos_token_id]])
        grad.append(ou_gradnorm(torch_model, x, y, 2))  # their rows end in EOS, dropped by them
        x, y, att = torch.tensor([ids]), torch.tensor([labels]), torch.ones((1, len(ids)), dtype=torch.long)
        gap.append(float(ou_avg_loss(torch_model, x, att, y)[0] - ou_avg_loss(ref_torch, x, att, y)[0]))
    labels01 = [0, 0, 0, 1, 1, 1]
    assert res["auc_gradnorm"] == pytest.approx(roc_auc_score(labels01, grad))
    assert res["auc_ref"] == pytest.approx(roc_auc_score(labels01, gap))
    check_options("mia", {"gradnorm_p": "inf"})
    with pytest.raises(ConfigError, match="gradnorm_p"):
        check_options("mia", {"gradnorm_p": 3})
