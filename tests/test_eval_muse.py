"""MUSE-News metrics against the official MUSE code (github.com/swj0419/muse_bench), re-derived here:
KnowMem / VerbMem with transformers' greedy ``generate`` and ``rouge_score`` on a tiny random Llama
over SmolLM2's vocabulary (metrics/knowmem.py, metrics/verbmem.py, metrics/logger.py), PrivLeak with
the real SmolLM2 on texts it favours, scored as metrics/privleak.py does (PyTorch + sklearn)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.errors import ConfigError
from sga_jax.eval import mia, muse

# metrics/knowmem.py line 50: the answer is cut at the first of these.
MUSE_STOP = ["\n\n", "\nQuestion", "Question:"]
# constants.py line 62: AUC_RETRAIN["news"]["forget_holdout_Min-40%"], the official retrain model.
NEWS_RETRAIN_AUC = 0.47719999999999996


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path, torch_model = write_tiny_hf(
        "llama", tmp_path_factory.mktemp("muse") / "llama", vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_position_embeddings=4096,
    )  # fmt: skip
    return sga_jax.load_model(path), torch_model


def official_generate(torch_model, tok, prompt: str, max_new_tokens: int) -> str:
    """metrics/knowmem.py lines 32-48 (verbmem.py lines 15-34): greedy HF generate, decoded."""
    input_ids = tok(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    with torch.no_grad():
        out = torch_model.generate(
            input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    out = out[:, len(input_ids[0]) :]
    return tok.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]


def test_prefix_cut_as_muse():
    assert muse._prefix_before("Paris\n\nQuestion: x") == "Paris"
    assert muse._prefix_before("1472 Question: next") == "1472 "


@pytest.mark.parametrize(("split", "files"), [("forget", "forget_qa"), ("retain", "retain2_qa")])
def test_knowmem_prompt_and_score_as_muse(tiny, smollm2_tokenizer, data_dir, split, files):
    model, torch_model = tiny
    tok = smollm2_tokenizer
    km = muse.knowmem(model, tok, split, limit=2, max_new_tokens=4)
    knowmem_dir = data_dir / "muse_news" / "knowmem"
    qa = json.loads((knowmem_dir / f"{files}.json").read_text())[:2]
    icl = json.loads((knowmem_dir / f"{files}_icl.json").read_text())
    assert len(icl) == 10 and len(km["logs"]) == 2
    # knowmem.py lines 22-29: the few-shot examples, then the question.
    few_shot = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    f1 = []
    for d, log in zip(qa, km["logs"]):
        prompt = few_shot + f"Question: {d['question']}\nAnswer: "
        assert log["prompt"] == prompt
        output = official_generate(torch_model, tok, prompt, 4)
        for word in MUSE_STOP:
            output = output.split(word)[0]
        assert log["output"] == output and log["gt"] == d["answer"]
        f1.append(scorer.score(d["answer"], output)["rougeL"].fmeasure)
    assert km[f"knowmem_{split}"] == pytest.approx(100 * np.mean(f1), abs=1e-12)


def test_verbmem_as_muse(tiny, smollm2_tokenizer, data_dir):
    model, torch_model = tiny
    tok = smollm2_tokenizer
    vm = muse.verbmem(model, tok, limit=2, max_new_tokens=8)
    rows = json.loads((data_dir / "muse_news" / "verbmem" / "forget.json").read_text())[:2]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    f1 = []
    for d, log in zip(rows, vm["logs"]):
        # verbmem.py lines 22 and 35-38: the ground truth cut to max_new_tokens tokens.
        gt_ids = tok(d["gt"], return_tensors="pt", add_special_tokens=True).input_ids[:, :8]
        gt_short = tok.batch_decode(gt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]
        output = official_generate(torch_model, tok, d["prompt"], 8)
        assert (log["prompt"], log["gt"], log["output"]) == (d["prompt"], gt_short, output)
        f1.append(scorer.score(gt_short, output)["rougeL"].fmeasure)
    assert vm["verbmem_f"] == pytest.approx(100 * np.mean(f1), abs=1e-12)


# Ordinary English (the model "knows" it, like a trained-on forget set) and the same words in reverse
# order (unfamiliar, like an unseen holdout set): SmolLM2 is a scorer that favours the forget texts.
FAMILIAR = [
    "The capital of France is Paris, and the river that runs through the city is the Seine.",
    "Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.",
    "The quick brown fox jumps over the lazy dog while the children watch from the garden.",
    "Every morning she drinks a cup of coffee and reads the newspaper before going to work.",
]
UNFAMILIAR = [" ".join(reversed(t.rstrip(".").split())) + "." for t in FAMILIAR]


def official_min_40(torch_model, tok, text: str) -> float:
    """metrics/privleak.py lines 13-28 and 42-46: the Min-40% score (minus the mean of the 40%
    lowest token log-probabilities)."""
    input_ids = torch.tensor(tok.encode(text)).unsqueeze(0)
    with torch.no_grad():
        logits = torch_model(input_ids).logits
    logp = torch.nn.functional.log_softmax(logits.double(), dim=-1)
    all_prob = [logp[0, i, t].item() for i, t in enumerate(input_ids[0][1:])]
    return float(-np.mean(np.sort(all_prob)[: int(len(all_prob) * 0.4)]))


def test_privleak_direction_as_muse(tmp_path, smollm2_jax, smollm2_torch, smollm2_tokenizer):
    """A model that favours the forget texts is under-unlearned: MUSE's AUC is near 0 and PrivLeak
    near -100 (the paper's target models); swapping forget and holdout would flip both."""
    from sklearn.metrics import auc as get_auc
    from sklearn.metrics import roc_curve

    tok = smollm2_tokenizer
    (tmp_path / "privleak").mkdir()
    (tmp_path / "privleak" / "forget.json").write_text(json.dumps(FAMILIAR))
    (tmp_path / "privleak" / "holdout.json").write_text(json.dumps(UNFAMILIAR))
    pl = muse.privleak(smollm2_jax, tok, retrain_auc=NEWS_RETRAIN_AUC, data_dir=tmp_path, max_length=64)
    forget = [official_min_40(smollm2_torch, tok, t) for t in FAMILIAR]
    holdout = [official_min_40(smollm2_torch, tok, t) for t in UNFAMILIAR]
    # privleak.py lines 58-61 and 83-89 for key "forget_holdout": forget = non-member (0), holdout = 1.
    ppl = np.array(forget + holdout)
    y = np.array([0] * len(forget) + [1] * len(holdout))
    fpr, tpr, _ = roc_curve(y, -ppl)
    want_auc = get_auc(fpr, tpr)
    assert max(forget) < min(holdout)  # the premise: every forget text is the more familiar one
    assert pl["auc"] == pytest.approx(want_auc, abs=1e-12) and want_auc == 0.0
    # eval.py line 78
    want = (want_auc - NEWS_RETRAIN_AUC) / NEWS_RETRAIN_AUC * 100
    assert pl["privleak"] == pytest.approx(want, abs=1e-9) and pl["privleak"] == pytest.approx(-100.0)
    # our per-text Min-40% scores are the official ones (negated: higher = more member-like)
    ours = mia.text_scores(smollm2_jax, tok, FAMILIAR + UNFAMILIAR, k=0.4, which=("min_k",))["min_k"]
    np.testing.assert_allclose(-ours, forget + holdout, rtol=2e-3, atol=2e-3)


def test_privleak_rejects_a_bad_retrain_auc(tiny, smollm2_tokenizer):
    with pytest.raises(ConfigError, match="retrain_auc"):
        muse.privleak(tiny[0], smollm2_tokenizer, limit=3, retrain_auc=0.0)


def test_perplexity_is_token_weighted(tiny, smollm2_tokenizer):
    model = tiny[0]
    texts = ["The cat sat on the mat.", "A much longer sentence about the weather in the north today."]
    s = mia.text_scores(model, smollm2_tokenizer, texts, which=("loss", "min_k_pp"))
    ppl = mia.perplexity(model, smollm2_tokenizer, texts)
    assert ppl == pytest.approx(np.exp(np.sum(s["nll"] * s["n_tokens"]) / s["n_tokens"].sum()), rel=1e-6)
    np.testing.assert_allclose(s["loss"], -s["nll"])
    assert np.isfinite(s["min_k_pp"]).all()


def test_evaluate_shows_a_bar_per_metric(tiny, smollm2_tokenizer, capsys):
    """muse.evaluate draws one tqdm bar per metric on stderr, each reaching its total."""
    model, _ = tiny
    muse.evaluate(model, smollm2_tokenizer, metrics=["verbmem_f", "knowmem_f"], limit=2)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    for desc in ("verbmem", "knowmem_forget"):
        assert any(x.startswith(desc) and "100%" in x and "2/2" in x for x in lines), desc
    muse.evaluate(model, smollm2_tokenizer, metrics=["verbmem_f"], limit=2, progress=False)
    assert "verbmem" not in capsys.readouterr().err
