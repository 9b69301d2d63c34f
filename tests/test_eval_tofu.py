"""TOFU evaluation: aggregation on the official Phi-1.5 logs, per-sample losses vs PyTorch, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tofu_reference
import torch
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.data import tofu
from sga_jax.data.formatting import PromptFormatter
from sga_jax.errors import DataError
from sga_jax.eval import tofu as tofu_eval

OFFICIAL_KEYS = [
    "avg_gt_loss", "gt_loss", "num_token_gt", "generated_text", "rouge1_recall", "rougeL_recall",
    "average_perturb_loss", "avg_paraphrased_loss", "truth_ratio", "paraphrased_loss", "perturb_loss",
    "num_token_paraphrased", "num_token_perturb",
]  # fmt: skip


def test_aggregate_official_phi_logs(data_dir):
    logs = data_dir / "tofu_eval_logs"
    full = tofu_eval.aggregate(logs / "phi-1.5_full", logs / "phi-1.5_retain90")
    assert full["model_utility"] == pytest.approx(0.5221, abs=1e-4)
    assert full["forget_quality"] == pytest.approx(2.194e-16, rel=1e-3)
    retain = tofu_eval.aggregate(logs / "phi-1.5_retain90")
    assert retain["model_utility"] == pytest.approx(0.5320, abs=1e-4) and retain["forget_quality"] is None
    components = [
        k for k in full if k.split("_")[0] in ("retain", "real", "world") and not k.endswith("_prob_mean")
    ]
    assert len(components) == 9


@pytest.mark.parametrize("model", ["phi-1.5_full", "phi-1.5_retain90"])
def test_all_twelve_components_equal_the_official_aggregation(data_dir, model):
    """Each of the 12 numbers (4 splits x prob / ROUGE-L / truth ratio), Model Utility and Forget
    Quality against aggregate_eval_stat.py re-derived in tests/tofu_reference.py."""
    logs = data_dir / "tofu_eval_logs"
    ours = tofu_eval.aggregate(logs / model, logs / "phi-1.5_retain90")
    want = tofu_reference.official_components(logs / model)
    assert len(tofu_reference.OUR_KEYS) == 12
    for official_name, key in tofu_reference.OUR_KEYS.items():
        assert ours[key] == pytest.approx(want[official_name], rel=1e-12, abs=1e-15), official_name
    assert ours["model_utility"] == pytest.approx(want["Model Utility"], rel=1e-12)
    p, stat = tofu_reference.official_forget_quality(logs / model, logs / "phi-1.5_retain90")
    assert (ours["forget_quality"], ours["ks_statistic"]) == pytest.approx((p, stat), rel=1e-12)
    # The components differ between splits and metrics: a mixed-up key would not pass unnoticed.
    assert len({round(want[k], 6) for k in tofu_reference.OUR_KEYS}) == 12


def test_aggregate_missing_file(tmp_path):
    with pytest.raises(DataError, match="eval_log.json"):
        tofu_eval.aggregate(tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama over SmolLM2's vocabulary, so real TOFU rows can be tokenised."""
    tok = smollm2_tokenizer
    path, torch_model = write_tiny_hf(
        "llama", tmp_path_factory.mktemp("tofu") / "llama", vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_position_embeddings=512,
    )  # fmt: skip
    return path, sga_jax.load_model(path), torch_model


def official_batch_loss(torch_model, tokenizer, question, answers, max_length=200):
    """locuslab/tofu: convert_raw_data_to_model_format + get_batch_loss (summed CE over labels)."""
    ids, labels, masks = [], [], []
    for answer in answers:
        new_question = "Question: " + question + "\n"
        full = new_question + "Answer: " + answer
        n_q = len(tokenizer.tokenize(new_question, add_special_tokens=True))
        enc = tokenizer(full, add_special_tokens=True, max_length=max_length, truncation=True)
        pad = max_length - len(enc.input_ids)
        ids.append(enc["input_ids"] + [tokenizer.eos_token_id] * pad)
        masks.append(enc["attention_mask"] + [0] * pad)
        label = enc["input_ids"] + [tokenizer.eos_token_id] + [-100] * (pad - 1)
        label[:n_q] = [-100] * n_q
        labels.append(label)
    ids, labels, masks = map(torch.tensor, (ids, labels, masks))
    with torch.no_grad():
        logits = torch_model(input_ids=ids, attention_mask=masks).logits
    loss = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        logits[:, :-1].transpose(-1, -2), labels[:, 1:]
    ).sum(-1)
    return loss.numpy(), (labels != -100).sum(-1).numpy()


def test_per_sample_losses_match_pytorch(tiny, smollm2_tokenizer):
    _, model, torch_model = tiny
    tok = smollm2_tokenizer
    rows = tofu.load_tofu("forget10_perturbed", limit=4)
    fmt = PromptFormatter(tok, "plain", max_length=200)
    logs = tofu_eval.evaluate_task(model, tok, rows, formatter=fmt, generate=False, batch_size=8)
    for i, row in enumerate(rows):
        answers = [row["answer"], row["paraphrased_answer"], *row["perturbed_answer"]]
        loss, n = official_batch_loss(torch_model, tok, row["question"], answers)
        np.testing.assert_allclose(logs["gt_loss"][i], loss[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logs["paraphrased_loss"][i], loss[1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logs["perturb_loss"][i], loss[2:], rtol=1e-4, atol=1e-4)
        assert logs["num_token_gt"][i] == n[0] and logs["num_token_perturb"][i] == n[2:].tolist()
        np.testing.assert_allclose(logs["avg_gt_loss"][i], loss[0] / n[0], rtol=1e-4)
        want_tr = np.exp(loss[1] / n[1] - np.mean(loss[2:] / n[2:]))
        np.testing.assert_allclose(logs["truth_ratio"][i], want_tr, rtol=1e-4)


def test_rouge_recall_as_tofu():
    from rouge_score import rouge_scorer

    gt, gen = "The author is Jaime Vasquez.", "Answer: Jaime Vasquez writes true crime."
    r1, rl = tofu_eval.rouge_recall([gt], [gen])
    s = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(gt, gen)
    assert (r1[0], rl[0]) == (s["rouge1"].recall, s["rougeL"].recall)
    assert r1[0] == pytest.approx(2 / 5)  # "jaime", "vasquez" of 5 gt tokens


def test_run_writes_official_files(tiny, smollm2_tokenizer, tmp_path, data_dir, capsys):
    from sga_jax.eval.run import evaluate

    path, model, _ = tiny
    res = evaluate(
        "tofu", path, tmp_path / "out", model=model, tokenizer=smollm2_tokenizer, limit=3,
        template="plain", max_new_tokens=6, batch_size=8,
    )  # fmt: skip
    official = json.loads((data_dir / "tofu_eval_logs/phi-1.5_full/eval_log_forget.json").read_text())
    for name in tofu_eval.FILES:
        log = json.loads((tmp_path / "out" / name).read_text())
        assert list(log) == OFFICIAL_KEYS
        assert list(log["gt_loss"]) == ["0", "1", "2"]
        assert len(log["average_perturb_loss"]["0"]) == len(official["average_perturb_loss"]["0"]) or (
            "real" in name and len(log["average_perturb_loss"]["0"]) == 3
        )
        prompt, gen, gt = log["generated_text"]["0"]
        assert prompt.startswith("Question: ") and prompt.endswith("\n") and isinstance(gen, str)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    # results.json says it was a 3-row run with these options, not the official 300-row protocol
    assert saved["limit"] == 3
    assert saved["options"] == {"limit": 3, "template": "plain", "max_new_tokens": 6, "batch_size": 8}
    # one progress bar per split, named by its data config, each reaching its total
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    for config in ("retain", "forget10", "real_authors", "world_facts"):
        assert any(f"{config}_perturbed" in x and "100%" in x for x in lines), config
    # A random model's greedy answers share no words with the truth: ROUGE 0 makes the hmean 0.
    assert saved["model_utility"] == res["model_utility"] == 0.0 and saved["retain_rougeL"] == 0.0
    assert 0 < saved["retain_prob"] < 1 and 0 < saved["real_authors_prob"] < 1


def test_retain_subset_is_seeded_and_recorded(tiny, smollm2_tokenizer, tmp_path):
    """retain_subset=2 evaluates the 2 retain rows subset_rows draws (the same for the same seed)."""
    _, model, _ = tiny
    pick = tofu_eval.subset_rows(5, 2, seed=3)
    assert pick == tofu_eval.subset_rows(5, 2, seed=3) and pick != tofu_eval.subset_rows(5, 2, seed=4)
    assert tofu_eval.subset_rows(5, 9) == [0, 1, 2, 3, 4]
    fmt = PromptFormatter(smollm2_tokenizer, "plain", max_length=200)
    tofu_eval.evaluate(
        model, smollm2_tokenizer, tmp_path, tasks=["eval_log"], limit=5, formatter=fmt, generate=False,
        retain_subset=2, subset_seed=3, progress=False,
    )  # fmt: skip
    log = json.loads((tmp_path / "eval_log.json").read_text())
    rows = tofu.load_tofu("retain_perturbed", limit=5)
    want = tofu_eval.evaluate_task(
        model, smollm2_tokenizer, [rows[i] for i in pick], formatter=fmt, generate=False, progress=False
    )
    assert list(log["gt_loss"]) == ["0", "1"]
    assert pick == [0, 3]  # not the first two rows: taking rows[:2] would fail below
    np.testing.assert_allclose(
        [log["gt_loss"][k] for k in ("0", "1")], [want["gt_loss"][i] for i in (0, 1)], rtol=1e-6
    )


def test_distance_to_retraining_is_the_token_kl_of_the_retain_model_to_the_model(
    tiny, smollm2_tokenizer, tmp_path, tmp_path_factory
):
    """``retain_model=``: the mean per-token KL(retain model ‖ model) over the ground-truth answer
    tokens of the forget and retain splits, against torch on the same rows (TOFU's plain format,
    written out here as locuslab/tofu does: official_batch_loss's labels); 0 for the model itself."""
    from sga_jax.eval.run import evaluate

    path, model, torch_model = tiny
    tok = smollm2_tokenizer
    other, torch_other = write_tiny_hf(
        "llama", tmp_path_factory.mktemp("retain") / "llama", seed=1, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_position_embeddings=512,
    )  # fmt: skip
    opts = dict(model=model, tokenizer=tok, limit=3, template="plain", generate=False, batch_size=2,
                memorization=False)  # fmt: skip
    res = evaluate("tofu", path, tmp_path / "a", retain_model=str(other), **opts)
    for split, config in (("forget", "forget10_perturbed"), ("retain", "retain_perturbed")):
        total, count = 0.0, 0
        for row in tofu.load_tofu(config, limit=3):
            new_question = "Question: " + row["question"] + "\n"
            n_q = len(tok.tokenize(new_question, add_special_tokens=True))
            ids = tok(new_question + "Answer: " + row["answer"], add_special_tokens=True)["input_ids"]
            ids = torch.tensor([ids + [tok.eos_token_id]])
            with torch.no_grad():
                lp = torch.log_softmax(torch_other(input_ids=ids).logits[0, :-1].double(), -1)
                lq = torch.log_softmax(torch_model(input_ids=ids).logits[0, :-1].double(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)[n_q - 1 :]  # the positions predicting answer tokens
            total, count = total + float(kl.sum()), count + kl.numel()
        assert res[f"kl_to_retain_{split}"] == pytest.approx(total / count, rel=1e-4), split
        assert res[f"kl_to_retain_{split}"] > 0.01
    itself = evaluate("tofu", path, tmp_path / "b", retain_model=str(path), **opts)
    assert itself["kl_to_retain_forget"] == pytest.approx(0.0, abs=1e-6)
    assert itself["kl_to_retain_retain"] == pytest.approx(0.0, abs=1e-6)
