"""TOFU's official aggregation, re-derived for the tests from locuslab/tofu ``aggregate_eval_stat.py``
(``get_model_utility``, lines 28-79, and ``get_forget_quality``, lines 10-26), independently of
``sga_jax.eval.tofu``: numpy + scipy on the eval-log JSON files, the official names kept.

``official_components(folder)`` -> ``{"Prob. Retain": ..., "ROUGE Forget": ..., "Truth Ratio Real
World": ..., "Model Utility": ...}``; ``OUR_KEYS`` maps each official name to ``aggregate()``'s key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import hmean, ks_2samp

TASKS = {
    "eval_real_author_wo_options.json": "Real Authors",
    "eval_real_world_wo_options.json": "Real World",
    "eval_log.json": "Retain",
    "eval_log_forget.json": "Forget",
}
OURS = {"Real Authors": "real_authors", "Real World": "world_facts", "Retain": "retain", "Forget": "forget"}
METRICS = {"ROUGE": "rougeL", "Prob.": "prob", "Truth Ratio": "truth_ratio"}
OUR_KEYS = {f"{m} {t}": f"{OURS[t]}_{k}" for t in TASKS.values() for m, k in METRICS.items()}


def load(folder: str | Path) -> dict[str, dict]:
    return {name: json.loads((Path(folder) / name).read_text()) for name in TASKS}


def _arr(log: dict, key: str) -> np.ndarray:
    return np.array(list(log[key].values()))


def official_components(folder: str | Path) -> dict[str, float]:
    out = {}
    for k, log in load(folder).items():
        task = TASKS[k]
        if "eval_log" in k:  # line 46: retain / forget: mean P(a)^(1/|a|)
            prob = np.mean(np.exp(-_arr(log, "avg_gt_loss")))
        else:  # lines 50-53: real authors / world: P(a) / (P(a) + Σ_j P(perturbed_j))
            true = np.exp(-_arr(log, "avg_gt_loss"))
            false = np.exp(-_arr(log, "average_perturb_loss"))
            prob = np.mean(true / np.concatenate([true[:, None], false], axis=1).sum(-1))
        out[f"Prob. {task}"] = float(prob)
        out[f"ROUGE {task}"] = float(_arr(log, "rougeL_recall").mean())
        ratio = np.exp(_arr(log, "average_perturb_loss").mean(axis=-1) - _arr(log, "avg_paraphrased_loss"))
        if "forget" in k:  # line 69
            out[f"Truth Ratio {task}"] = float(np.mean(np.minimum(ratio, 1 / ratio)))
        else:  # line 71
            out[f"Truth Ratio {task}"] = float(np.mean(np.maximum(0, 1 - 1 / ratio)))
    out["Model Utility"] = float(hmean([v for name, v in out.items() if "Forget" not in name]))
    return out


def official_forget_quality(unlearned: str | Path, retain: str | Path) -> tuple[float, float]:
    """``(p-value, KS statistic)`` of the forget-set truth ratios (lines 14-25)."""

    def ratios(folder):
        log = load(folder)["eval_log_forget.json"]
        para = _arr(log, "avg_paraphrased_loss")
        return np.exp(_arr(log, "average_perturb_loss").mean(axis=-1) - para)

    res = ks_2samp(ratios(unlearned), ratios(retain))
    return float(res.pvalue), float(res.statistic)
