"""The demo pipeline (`sga-jax demo`) on a tiny random model: the real demo (SmolLM2-135M, a few
minutes) is marked slow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import write_tiny_llama_for

from sga_jax import demo


def test_builtin_facts():
    facts = demo.load_facts()
    assert (len(facts["forget"]), len(facts["retain"])) == (20, 40)
    questions = [f["question"] for f in facts["forget"] + facts["retain"]]
    assert len(set(questions)) == 60
    assert all(f["lead"] and f["answer"] for f in facts["forget"] + facts["retain"])


def _answer_probs(model_dir, batch) -> np.ndarray:
    """P(answer | prompt) per row, from a model loaded afresh and its full logits (not the demo's
    own evaluator)."""
    import jax
    import jax.numpy as jnp

    import sga_jax

    model = sga_jax.load_model(model_dir)
    ids = jnp.asarray(batch["input_ids"])
    logits = model(ids, jnp.asarray(batch["attention_mask"]))[:, :-1].astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[:, 1:, None], axis=-1)[..., 0]
    return np.exp(np.asarray(jnp.sum(logp * batch["loss_mask"][:, 1:], axis=-1), np.float64))


def test_demo_pipeline_on_a_tiny_model(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path, _ = write_tiny_llama_for(tok, tmp_path / "tiny")
    facts = demo.load_facts()
    facts = {"forget": facts["forget"][:4], "retain": facts["retain"][:8]}
    out = tmp_path / "demo"
    report = demo.run_demo(
        out=out, model_path=str(path), facts=facts, steps=2, generate=False, progress=False,
        overrides=["train.lr=1e-3"], export=True,
    )  # fmt: skip
    assert report["steps"] == 2
    # the per-fact numbers are the start model's and the exported unlearned model's probabilities
    batch = demo.encode_facts(facts["forget"] + facts["retain"], tok, 32)
    per_fact = report["per_fact"]
    assert [f["set"] for f in per_fact] == ["forget"] * 4 + ["retain"] * 8
    before, after = _answer_probs(path, batch), _answer_probs(report["model_dir"], batch)
    np.testing.assert_allclose([f["before"] for f in per_fact], before, rtol=2e-4)
    np.testing.assert_allclose([f["after"] for f in per_fact], after, rtol=2e-4)
    assert report["forget_prob_before"] == pytest.approx(before[:4].mean(), rel=2e-4)
    assert report["forget_prob_after"] == pytest.approx(after[:4].mean(), rel=2e-4)
    assert report["retain_prob_after"] == pytest.approx(after[4:].mean(), rel=2e-4)
    # unlearning happened: every forget fact's probability fell (measured: the mean to 0.51x)
    assert np.all(after[:4] < before[:4]), (before[:4], after[:4])
    assert report["forget_ratio"] < 0.8
    assert report["forget_target_met"] == (report["forget_ratio"] <= demo.FORGET_TARGET)
    assert (out / "probabilities.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "demo_report.json").read_text())["steps"] == 2
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    text = demo.format_report(report)
    assert "forget facts P(answer)" in text and "retain facts P(answer)" in text


@pytest.mark.slow
def test_real_demo_meets_its_targets(tmp_path):
    """`sga-jax demo` itself: SmolLM2-135M-Instruct, the built-in facts (minutes on a 2-core CPU)."""
    report = demo.run_demo(out=tmp_path / "demo", progress=False)
    assert report["forget_target_met"] and report["retain_target_met"], demo.format_report(report)


@pytest.mark.slow
def test_real_gemma_demo_meets_its_targets(tmp_path):
    """`sga-jax demo --model gemma3-270m` (measured: forget 0.213x, retain 0.870x of their start)."""
    report = demo.run_demo(out=tmp_path / "demo", model="gemma3-270m", progress=False)
    assert report["forget_target_met"] and report["retain_target_met"], demo.format_report(report)


def test_console_report_names_the_facts_the_means_hide():
    """The console says which forget facts are still known and how many retain facts fell, even
    when both mean targets are met (the issue: "met" while Paris stayed known)."""
    fact = lambda s, a, b, z: {"set": s, "question": "q", "answer": a, "before": b, "after": z}  # noqa: E731
    per_fact = [
        fact("forget", "Paris", 0.97, 0.83), fact("forget", "Tokyo", 0.91, 0.001),
        fact("forget", "Berlin", 0.97, 0.01), fact("retain", "Rome", 0.82, 0.75),
        fact("retain", "Madrid", 0.80, 0.35),
    ]  # fmt: skip
    report = dict(
        forget_prob_before=0.95, forget_prob_after=0.28, retain_prob_before=0.81, retain_prob_after=0.55,
        forget_ratio=0.2, retain_ratio=0.8, forget_target_met=True, retain_target_met=True, examples=[],
        steps=14, seconds_total=1.0, seconds_load=0.1, seconds_train=0.5, plot="p.png", per_fact=per_fact,
    )  # fmt: skip
    text = demo.format_report(report)
    assert "2 of 3 forget facts end at P <= 0.02" in text
    assert "1 are still known" in text and "still known: Paris (0.97 -> 0.83)" in text
    assert "1 of 2 retain facts fell below 0.75 x their start" in text
    assert "Tokyo" not in text.split("still known")[-1].split("\n")[0]


def test_unknown_demo_model_is_one_line(tmp_path):
    from sga_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model 'llama'; use one of smollm2, gemma3-270m"):
        demo.run_demo(out=tmp_path / "demo", model="llama", progress=False)
    assert not (tmp_path / "demo").exists()
