"""MUSE-News metrics on a tiny random Llama over SmolLM2's vocabulary (few items)."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.errors import ConfigError
from sga_jax.eval import mia, muse


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path, _ = write_tiny_hf(
        "llama", tmp_path_factory.mktemp("muse") / "llama", vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_position_embeddings=4096,
    )  # fmt: skip
    return sga_jax.load_model(path)


def test_prefix_cut_as_muse():
    assert muse._prefix_before("Paris\n\nQuestion: x") == "Paris"
    assert muse._prefix_before("1472 Question: next") == "1472 "


def test_knowmem_verbmem_privleak(tiny, smollm2_tokenizer, data_dir):
    tok = smollm2_tokenizer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    km = muse.knowmem(tiny, tok, "forget", limit=2, max_new_tokens=4)
    want = np.mean([scorer.score(r["gt"], r["output"])["rougeL"].fmeasure for r in km["logs"]]) * 100
    assert km["knowmem_forget"] == pytest.approx(want) and len(km["logs"]) == 2
    vm = muse.verbmem(tiny, tok, limit=2, max_new_tokens=8)
    assert len(tok(vm["logs"][0]["gt"], add_special_tokens=False)["input_ids"]) <= 9
    assert 0 <= vm["verbmem_f"] <= 100
    pl = muse.privleak(tiny, tok, limit=3, max_length=64, retrain_auc=0.5)
    assert pl["privleak"] == pytest.approx((pl["auc"] - 0.5) / 0.5 * 100)
    with pytest.raises(ConfigError):
        muse.privleak(tiny, tok, limit=3, retrain_auc=0.0)


def test_perplexity_is_token_weighted(tiny, smollm2_tokenizer):
    texts = ["The cat sat on the mat.", "A much longer sentence about the weather in the north today."]
    s = mia.text_scores(tiny, smollm2_tokenizer, texts, which=("loss", "min_k_pp"))
    ppl = mia.perplexity(tiny, smollm2_tokenizer, texts)
    assert ppl == pytest.approx(np.exp(np.sum(s["nll"] * s["n_tokens"]) / s["n_tokens"].sum()), rel=1e-6)
    np.testing.assert_allclose(s["loss"], -s["nll"])
    assert np.isfinite(s["min_k_pp"]).all()
