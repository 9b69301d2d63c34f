"""TOFU evaluation (Maini et al. 2024, arXiv 2401.06121), as locuslab/tofu's ``evaluate_util.py``.

:func:`evaluate_task` computes, for one evaluation split, everything the official evaluation logs:
per sample the summed / token-mean NLL of the answer (``gt_loss``, ``avg_gt_loss``), of the
paraphrased (or, for real authors / world facts, the original) answer and of each perturbed answer,
the truth ratio ``exp(avg_paraphrased_loss − mean_j avg_perturb_loss_j)`` as the official log stores
it, and the ROUGE-1 / ROUGE-L recall of the greedy answer (``rouge_score`` with the stemmer).
:func:`evaluate` runs the four splits and writes the official files (``eval_log.json``,
``eval_log_forget.json``, ``eval_real_author_wo_options.json``, ``eval_real_world_wo_options.json``).

:func:`aggregate` is ``aggregate_eval_stat.py``: with ``R = exp(mean_j avgloss(perturbed_j) −
avgloss(paraphrased))``, truth ratio = ``mean(min(R, 1/R))`` on the forget set and
``mean(max(0, 1 − 1/R))`` elsewhere; probability = ``mean exp(−avg_gt_loss)`` on retain / forget and
``mean P(a) / (P(a) + Σ_j P(perturbed_j))`` on real authors / world facts; Model Utility =
``scipy.stats.hmean`` of the nine non-forget numbers; Forget Quality = the p-value of
``scipy.stats.ks_2samp`` between the forget-set R of the unlearned and of the retain model. Beside
them, per split, open-unlearning's ``prob_mean`` truth ratio ``mean P(para) / (P(para) + P(pert))``
(:func:`truth_ratios_prob_mean`), and (:func:`forget_memorization`) the extraction strength and
exact memorization of the forget answers (open-unlearning's ``configs/eval/tofu_metrics``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import hmean, ks_2samp
from tqdm.auto import tqdm

from sga_jax.data.formatting import Encoded, PromptFormatter
from sga_jax.data.jsonl import write_json_atomic
from sga_jax.data.tofu import EVAL_TASKS, load_tofu
from sga_jax.errors import DataError
from sga_jax.eval.generate import greedy_generate
from sga_jax.eval.scoring import grouped_sequence_nll

log = logging.getLogger(__name__)

# eval-log file -> short name used in aggregate()'s keys
FILES: dict[str, str] = {
    "eval_log.json": "retain",
    "eval_real_author_wo_options.json": "real_authors",
    "eval_real_world_wo_options.json": "world_facts",
    "eval_log_forget.json": "forget",
}
MODEL_UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
METRICS = ("prob", "rougeL", "truth_ratio")


def rouge_recall(ground_truths: Sequence[str], generations: Sequence[str]) -> tuple[list, list]:
    """ROUGE-1 and ROUGE-L recall of each generation against its ground truth (TOFU's
    ``eval_rouge_recall``: ``RougeScorer(['rouge1', 'rougeL'], use_stemmer=True).score(gt, gen)``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = [], []
    for gt, gen in zip(ground_truths, generations):
        s = scorer.score(gt, gen)
        r1.append(s["rouge1"].recall)
        rl.append(s["rougeL"].recall)
    return r1, rl


def _answer_groups(
    rows: Sequence[dict[str, Any]], fmt: PromptFormatter, base_answer_key: str, source: str
) -> tuple[list[list[Encoded]], list[tuple[int, int, int, int]], list[int]]:
    """``(groups, layout, kept)``: per kept row its distinct encoded answers (gt, base unless equal
    to gt, perturbed), where each lies in the flat order (gt, base, first perturbed, n perturbed),
    and the kept row indices. Rows whose prompt does not fit are skipped with one warning."""
    groups: list[list[Encoded]] = []  # per kept row: its distinct answer sequences
    layout: list[tuple[int, int, int, int]] = []  # row -> (gt, base, first perturbed, n perturbed)
    kept: list[int] = []
    skipped: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        for key in ("question", "answer", base_answer_key, "perturbed_answer"):
            if key not in row:
                raise DataError(f"{source}: row {i} has no key {key!r}")
        answers = [row["answer"], row[base_answer_key], *row["perturbed_answer"]]
        encs = [fmt.encode_qa(row["question"], a) for a in answers]
        bad = next((e for e in encs if isinstance(e, str)), None)
        if bad is not None:
            skipped.append((i, bad))
            continue
        start = sum(len(g) for g in groups)
        same_base = row[base_answer_key] == row["answer"]  # real authors / world facts: scored once
        groups.append([encs[0]] + ([] if same_base else [encs[1]]) + encs[2:])
        base = start if same_base else start + 1
        layout.append((start, base, base + 1, len(row["perturbed_answer"])))
        kept.append(i)
    if skipped:
        log.warning("%s: skipped %d rows (first: row %d: %s)", source, len(skipped), *skipped[0])
    if not kept:
        raise DataError(f"{source}: every row was skipped (first: row {skipped[0][0]}: {skipped[0][1]})")
    return groups, layout, kept


def evaluate_task(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    *,
    base_answer_key: str = "paraphrased_answer",
    formatter: PromptFormatter | None = None,
    batch_size: int = 16,
    generation_batch_size: int | None = None,
    generate: bool = True,
    generation_max_length: int = 200,
    max_new_tokens: int = 200,
    source: str = "tofu",
    progress: bool = True,
    calls: list[tuple] | None = None,
) -> dict[str, dict[int, Any]]:
    """The official per-sample eval log of one split (keys as ``evaluate_util.get_all_evals``).
    ``progress``: a tqdm bar on stderr over the sequences scored and the answers generated.
    ``calls``: when a list, the shape of every model call is appended to it (see
    :func:`sga_jax.eval.flops.calls_flops`).

    Rows whose prompt does not fit ``formatter.max_length`` are skipped and reported (warning);
    their indices are absent from the log.
    """
    fmt = formatter or PromptFormatter(tokenizer, "auto", max_length=512)
    groups, layout, kept = _answer_groups(rows, fmt, base_answer_key, source)
    n_seqs = sum(len(g) for g in groups)
    n_trunc = sum(e.truncated for g in groups for e in g)
    if n_trunc:
        log.warning("%s: %d answer sequences truncated to max_length=%d", source, n_trunc, fmt.max_length)

    # One split of TOFU takes minutes on a CPU: show the scored sequences and generated answers.
    bar = tqdm(total=n_seqs + (len(kept) if generate else 0), desc=source, unit="seq", disable=not progress)
    try:
        # A question's answers share its prompt: scored as one group, the prompt run once.
        scored = grouped_sequence_nll(
            model, groups, pad_id=fmt.pad_token_id, batch_size=batch_size, progress=bar.update,
            calls=calls,
        )  # fmt: skip
        total = np.concatenate([t for t, _ in scored])
        count = np.concatenate([c for _, c in scored])
        logs = _losses_log(kept, layout, total, count)
        if generate:
            gen = {"max_new_tokens": max_new_tokens, "generation_max_length": generation_max_length,
                   "batch_size": generation_batch_size or batch_size, "calls": calls}  # fmt: skip
            _add_generations(logs, model, tokenizer, fmt, rows, kept, bar.update, **gen)
        else:
            for k in ("generated_text", "rouge1_recall", "rougeL_recall"):
                del logs[k]
    finally:
        bar.close()
    return logs


def _losses_log(kept, layout, total, count) -> dict[str, dict[int, Any]]:
    logs: dict[str, dict[int, Any]] = {
        k: {}
        for k in (
            "avg_gt_loss", "gt_loss", "num_token_gt", "generated_text", "rouge1_recall", "rougeL_recall",
            "average_perturb_loss", "avg_paraphrased_loss", "truth_ratio", "paraphrased_loss",
            "perturb_loss", "num_token_paraphrased", "num_token_perturb",
        )
    }  # fmt: skip
    for i, (g, b, p, n) in zip(kept, layout):
        pert = slice(p, p + n)
        avg_pert = total[pert] / count[pert]
        avg_base = total[b] / count[b]
        logs["avg_gt_loss"][i] = float(total[g] / count[g])
        logs["gt_loss"][i] = float(total[g])
        logs["num_token_gt"][i] = int(count[g])
        logs["average_perturb_loss"][i] = avg_pert.tolist()
        logs["avg_paraphrased_loss"][i] = float(avg_base)
        logs["truth_ratio"][i] = float(np.exp(avg_base - avg_pert.mean()))
        logs["paraphrased_loss"][i] = float(total[b])
        logs["perturb_loss"][i] = total[pert].tolist()
        logs["num_token_paraphrased"][i] = int(count[b])
        logs["num_token_perturb"][i] = count[pert].tolist()
    return logs


def _add_generations(logs, model, tokenizer, fmt, rows, kept, progress, **kw) -> None:
    """Greedy answers and their ROUGE recall against the ground truth, into ``logs``."""
    prompts = [fmt.generation_prompt(rows[i]["question"]) for i in kept]
    ids = [fmt.encode_prompt(p) for p in prompts]
    res = greedy_generate(
        model,
        ids,
        max_new_tokens=kw["max_new_tokens"],
        max_length=kw["generation_max_length"],
        eos_token_id=fmt.eos_token_id,
        pad_token_id=fmt.pad_token_id,
        batch_size=kw["batch_size"],
        tokenizer=tokenizer,
        progress=progress,
        calls=kw["calls"],
    )
    gts = [rows[i]["answer"] for i in kept]
    r1, rl = rouge_recall(gts, res.texts)
    for j, i in enumerate(kept):
        logs["generated_text"][i] = [prompts[j], res.texts[j], gts[j]]
        logs["rouge1_recall"][i] = r1[j]
        logs["rougeL_recall"][i] = rl[j]


def subset_rows(n_rows: int, size: int, seed: int = 0) -> list[int]:
    """``size`` of the indices ``0 .. n_rows-1`` drawn with ``numpy.random.default_rng(seed)``,
    sorted (all of them when ``size >= n_rows``): a fixed, seeded evaluation subset."""
    if size >= n_rows:
        return list(range(n_rows))
    return sorted(np.random.default_rng(seed).choice(n_rows, size, replace=False).tolist())


def evaluate(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    forget_split: str = "forget10",
    limit: int | None = 300,
    tasks: Sequence[str] = tuple(EVAL_TASKS),
    source: str = "local",
    data_dir: str | os.PathLike | None = None,
    formatter: PromptFormatter | None = None,
    retain_subset: int | None = None,
    subset_seed: int = 0,
    hub_repo: str | None = None,
    **task_kwargs: Any,
) -> dict[str, Path]:
    """Run TOFU's four evaluation splits and write the official eval-log files into ``out_dir``.

    ``limit`` keeps the first rows of each split (the official ``ds_size`` is 300; real authors and
    world facts have 100 and 117). ``retain_subset``: evaluate only that many of the retain split's
    rows (after ``limit``), drawn with ``subset_seed`` (:func:`subset_rows`); its log is keyed
    0..n-1 in row order, as any eval log. ``hub_repo``: with ``source="hub"``, the dataset repository
    (or a local copy of it) instead of ``locuslab/TOFU``. Returns ``{file name: path}``.
    """
    out = Path(out_dir)
    written = {}
    for task in tasks:
        if task not in EVAL_TASKS:
            raise DataError(f"unknown TOFU eval task {task!r}; use {sorted(EVAL_TASKS)}")
        config, base_key = EVAL_TASKS[task]
        if task == "eval_log_forget":
            config = f"{forget_split}_perturbed"
        rows = load_tofu(config, source=source, data_dir=data_dir, limit=limit, hub_repo=hub_repo)
        if task == "eval_log" and retain_subset is not None:
            rows = [rows[i] for i in subset_rows(len(rows), retain_subset, subset_seed)]
        logs = evaluate_task(
            model, tokenizer, rows, base_answer_key=base_key, formatter=formatter, source=config,
            **task_kwargs,
        )  # fmt: skip
        bad = next((k for k in ("avg_gt_loss", "avg_paraphrased_loss")
                    if not np.isfinite(list(logs[k].values())).all()), None)  # fmt: skip
        if bad is not None:  # a NaN log is no result (and not valid JSON): refused before it is written
            raise DataError(f"TOFU {config}: the model's {bad} is NaN or inf (are its weights finite?)")
        written[f"{task}.json"] = write_json_atomic(logs, out / f"{task}.json", indent=4)
    return written


def _encoded_answers(fmt: PromptFormatter, rows: Sequence[dict], config: str) -> list[Encoded]:
    """Each row's question with its ground-truth answer as targets; rows whose prompt does not fit
    are left out (as in :func:`evaluate_task`), none fitting is a DataError."""
    encoded = [e for e in (fmt.encode_qa(r["question"], r["answer"]) for r in rows) if not isinstance(e, str)]
    if not encoded:
        raise DataError(f"{config}: no answer fits max_length={fmt.max_length}")
    return encoded


def forget_memorization(
    model: Any,
    tokenizer: Any,
    *,
    forget_split: str = "forget10",
    limit: int | None = 300,
    formatter: PromptFormatter | None = None,
    batch_size: int = 16,
    source: str = "local",
    data_dir: str | os.PathLike | None = None,
    hub_repo: str | None = None,
) -> dict[str, float | None]:
    """``{"forget_extraction_strength", "forget_exact_memorization"}``: the means over the forget
    split's questions of :func:`sga_jax.eval.memorization.memorization_scores` of the ground-truth
    answer (open-unlearning ``configs/eval/tofu_metrics/extraction_strength.yaml`` and
    ``exact_memorization.yaml``: ``TOFU_QA_forget`` on ``{forget_split}_perturbed``). Rows whose
    prompt does not fit are left out, as in :func:`evaluate_task`."""
    from sga_jax.eval.memorization import mean_scores, memorization_scores

    fmt = formatter or PromptFormatter(tokenizer, "auto", max_length=512)
    config = f"{forget_split}_perturbed"
    rows = load_tofu(config, source=source, data_dir=data_dir, limit=limit, hub_repo=hub_repo)
    encoded = _encoded_answers(fmt, rows, config)
    scores = memorization_scores(model, encoded, pad_id=fmt.pad_token_id, batch_size=batch_size)
    return {f"forget_{k}": v for k, v in mean_scores(scores).items()}


def distance_to_retraining(
    model: Any,
    retain_model: Any,
    tokenizer: Any,
    *,
    forget_split: str = "forget10",
    limit: int | None = 300,
    formatter: PromptFormatter | None = None,
    batch_size: int = 16,
    source: str = "local",
    data_dir: str | os.PathLike | None = None,
    hub_repo: str | None = None,
    retain_subset: int | None = None,
    subset_seed: int = 0,
) -> dict[str, float]:
    """``{"kl_to_retain_forget", "kl_to_retain_retain"}``: the mean per-token ``KL(retain model ‖
    model)`` over the ground-truth answer tokens of the forget split and of the retain split
    (teacher-forced: both models read the same question and answer; each answer token weighs the
    same; :func:`sga_jax.output_space.token_kl`). The distance to retraining in output space, which
    K-FADE (arXiv 2602.10568) claims to approximate; 0 for the retain model itself. The rows are
    those of :func:`evaluate` (``limit``, the retain subset); rows whose prompt does not fit are
    left out. ``retain_model`` must share the tokenizer."""
    from sga_jax.data.batching import iterate_batches
    from sga_jax.output_space import token_kl

    fmt = formatter or PromptFormatter(tokenizer, "auto", max_length=512)
    out = {}
    for name, config in (("forget", f"{forget_split}_perturbed"), ("retain", "retain_perturbed")):
        rows = load_tofu(config, source=source, data_dir=data_dir, limit=limit, hub_repo=hub_repo)
        if name == "retain" and retain_subset is not None:
            rows = [rows[i] for i in subset_rows(len(rows), retain_subset, subset_seed)]
        enc = _encoded_answers(fmt, rows, config)
        batches = (
            b for _, b in iterate_batches(enc, batch_size, pad_id=fmt.pad_token_id, padding_side="right",
                                          bucket=32, sort_by_length=True)
        )  # fmt: skip
        out[f"kl_to_retain_{name}"] = token_kl(retain_model, model, batches)
    return out


# ------------------------------------------------------------------------------------ aggregation


def read_logs(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"TOFU eval-log folder not found: {d}")
    logs = {}
    for name in FILES:
        path = d / name
        if not path.is_file():
            raise DataError(f"{d} has no {name} (run the TOFU evaluation first)")
        try:
            logs[name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON: {e}") from None
    return logs


def _values(log: dict[str, Any], key: str, path: str) -> np.ndarray:
    if key not in log:
        raise DataError(f"{path} has no key {key!r}")
    return np.array(list(log[key].values()), dtype=np.float64)


def truth_ratios(log: dict[str, Any], name: str = "eval log") -> np.ndarray:
    """``R = exp(mean_j avg_perturb_loss_j − avg_paraphrased_loss)`` per sample."""
    para = _values(log, "avg_paraphrased_loss", name)
    pert = _values(log, "average_perturb_loss", name).mean(axis=-1)
    return np.exp(pert - para)


def truth_ratios_prob_mean(log: dict[str, Any], name: str = "eval log") -> np.ndarray:
    """open-unlearning's truth ratio for the ``prob_mean`` aggregator (``memorization.py`` lines
    159-167, PR #163, commit d3d7cf9): ``c / (c + w + 1e-10)`` per sample with
    ``c = exp(−avg_paraphrased_loss)`` and ``w = exp(−mean_j avg_perturb_loss_j)`` (their
    ``aggregate_to_1D`` of the perturbed losses); the split's score is the mean (lines 123-124)."""
    correct = np.exp(-_values(log, "avg_paraphrased_loss", name))
    wrong = np.exp(-_values(log, "average_perturb_loss", name).mean(axis=-1))
    return correct / (correct + wrong + 1e-10)


def split_metrics(log: dict[str, Any], file_name: str) -> dict[str, float | None]:
    """Probability, ROUGE-L recall and truth-ratio score of one eval log (see module docstring)."""
    gt_prob = np.exp(-_values(log, "avg_gt_loss", file_name))
    if file_name.startswith("eval_log"):
        prob = float(np.mean(gt_prob))
    else:
        false_prob = np.exp(-_values(log, "average_perturb_loss", file_name))
        prob = float(np.mean(gt_prob / (gt_prob + false_prob.sum(axis=-1))))
    # generate=false logs no generations: no ROUGE, hence no Model Utility (the rest stands)
    rouge = float(np.mean(_values(log, "rougeL_recall", file_name))) if "rougeL_recall" in log else None
    r = truth_ratios(log, file_name)
    if "forget" in file_name:
        tr = float(np.mean(np.minimum(r, 1.0 / r)))
    else:
        tr = float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))
    return {"prob": prob, "rougeL": rouge, "truth_ratio": tr}


def aggregate(unlearned_dir: str | os.PathLike, retain_dir: str | os.PathLike | None = None) -> dict:
    """Model Utility, Forget Quality and their components from two eval-log folders.

    Returns ``{"model_utility", "forget_quality", "ks_statistic", "<split>_<metric>" ...}`` with split in
    retain / real_authors / world_facts / forget and metric in prob / rougeL / truth_ratio (the first
    nine enter Model Utility) or truth_ratio_prob_mean (:func:`truth_ratios_prob_mean`'s mean).
    ``forget_quality`` is None without ``retain_dir``; ``model_utility`` and the ``*_rougeL`` entries
    are None for logs without generations (``generate=false``).
    """
    logs = read_logs(unlearned_dir)
    out: dict[str, Any] = {}
    for file_name, split in FILES.items():
        for metric, value in split_metrics(logs[file_name], file_name).items():
            out[f"{split}_{metric}"] = value
        # open-unlearning's paper-style truth ratio, beside TOFU's (not a Model Utility component)
        out[f"{split}_truth_ratio_prob_mean"] = float(
            np.mean(truth_ratios_prob_mean(logs[file_name], file_name))
        )
    components = [out[f"{s}_{m}"] for s in MODEL_UTILITY_SPLITS for m in METRICS]
    out["model_utility"] = None if None in components else float(hmean(components))
    out["forget_quality"] = out["ks_statistic"] = None
    if retain_dir is not None:
        retain = read_logs(retain_dir)
        ours, theirs = logs["eval_log_forget.json"], retain["eval_log_forget.json"]
        if set(ours.get("avg_gt_loss", {})) != set(theirs.get("avg_gt_loss", {})):
            raise DataError(
                f"retain logs {retain_dir} cover {len(theirs.get('avg_gt_loss', {}))} forget questions, this "
                f"evaluation {len(ours.get('avg_gt_loss', {}))}: Forget Quality needs the same forget split "
                "and limit on both sides"
            )
        test = ks_2samp(
            truth_ratios(logs["eval_log_forget.json"], "unlearned eval_log_forget.json"),
            truth_ratios(retain["eval_log_forget.json"], "retain eval_log_forget.json"),
        )
        out["forget_quality"] = float(test.pvalue)
        out["ks_statistic"] = float(test.statistic)
    return {"model_utility": out.pop("model_utility"), "forget_quality": out.pop("forget_quality"), **out}
