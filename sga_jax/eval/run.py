"""``evaluate(benchmark, model_path, out_dir, **options)``: load a model, run a benchmark, write JSON.

Benchmarks:

* ``"tofu"``: the four official eval-log files + ``results.json`` from :func:`sga_jax.eval.tofu.aggregate`
  (Forget Quality when ``retain_logs=`` names a retain model's eval-log folder). Options:
  ``forget_split`` (forget01/05/10), ``limit`` (300), ``template`` (auto/chat/plain), ``max_length``,
  ``batch_size``, ``generate``, ``max_new_tokens``, ``generation_max_length``, ``retain_subset`` /
  ``subset_seed`` (a seeded subset of the retain split's rows), ``memorization`` (true: also the
  forget answers' extraction strength / exact memorization, :func:`sga_jax.eval.tofu.forget_memorization`),
  ``retain_model`` (a model folder: also the mean per-token KL(retain model ‖ model) on the forget
  and retain answers, :func:`sga_jax.eval.tofu.distance_to_retraining`).
* ``"muse_news"``: VerbMem / KnowMem / PrivLeak (``retrain_auc=``), ``limit``, ``metrics``.
* ``"muse_books"``: the same on MUSE-Books (Harry Potter; :data:`sga_jax.data.muse.CORPORA`).
* ``"ppl"``: perplexity of a text set: ``data=`` a JSON/JSONL file of ``{"text"}`` or QA rows, or
  ``tofu:<config>`` / ``muse:raw`` style names; ``limit``, ``max_length``.
* ``"mia"``: LOSS / zlib / Min-K% / Min-K%++ AUC of ``members=`` vs ``nonmembers=`` (same naming as
  ``data``; default MUSE-News privleak forget vs holdout), ``k``; ``gradnorm_p=`` (1, 2 or "inf")
  adds the gradient-norm AUC, ``reference_model=`` (a path) the reference-model loss-gap AUC.
* ``"wmdp"``: multiple-choice accuracy on a WMDP-format file (``data=``) or hub config (``source="hub"``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sga_jax.data import muse as muse_data
from sga_jax.data import tofu as tofu_data
from sga_jax.data.formatting import Encoded, PromptFormatter
from sga_jax.data.jsonl import load_user_rows, write_json_atomic
from sga_jax.data.wmdp import choice_continuations, format_prompt, load_wmdp
from sga_jax.errors import ConfigError, DataError
from sga_jax.eval import muse, tofu
from sga_jax.eval.mia import SCORES, auc, perplexity, text_gradnorm_scores, text_scores
from sga_jax.eval.options import check_options
from sga_jax.eval.scoring import summed_nll
from sga_jax.fsutil import write_marker
from sga_jax.models.hf import load_model, load_tokenizer

BENCHMARKS = ("tofu", "muse_news", "muse_books", "ppl", "mia", "wmdp")
# The files each benchmark writes into its folder besides results.json (listed in its export marker).
WRITES: dict[str, tuple[str, ...]] = {
    "tofu": tuple(tofu.FILES), "muse_news": ("muse_logs.json",), "muse_books": ("muse_logs.json",),
}  # fmt: skip


def _texts(spec: str, limit: int | None, data_dir=None) -> list[str]:
    """Texts named by ``spec``: a file path, ``tofu:<config>``, ``muse:raw[/split]`` or
    ``muse:privleak/<split>``. QA rows become ``"{question} {answer}"``."""
    if spec.startswith("tofu:"):
        rows = tofu_data.load_tofu(spec[5:], data_dir=data_dir, limit=limit)
    elif spec.startswith("muse:"):
        part, _, split = spec[5:].partition("/")
        if part == "raw":
            rows = muse_data.load_raw(split or "forget", data_dir=data_dir, limit=limit)
        elif part == "privleak":
            rows = muse_data.load_privleak(split or "forget", data_dir=data_dir, limit=limit)
        else:
            raise ConfigError(
                f"unknown MUSE text set {spec!r}; use muse:raw[/split] or muse:privleak/<split>"
            )
    else:
        rows = load_user_rows(spec)
        rows = rows[:limit] if limit else rows
    return [r["text"] if "text" in r else f"{r['question']} {r['answer']}" for r in rows]


def wmdp_accuracy(model: Any, tokenizer: Any, rows: list[dict], *, batch_size: int = 8) -> dict[str, Any]:
    """Accuracy of picking the letter (" A" .. " D") with the highest log-probability after the
    WMDP prompt (lm-evaluation-harness' multiple-choice scoring)."""
    seqs = []
    for r in rows:
        prompt = tokenizer(format_prompt(r), add_special_tokens=True)["input_ids"]
        for cont in choice_continuations():
            c = tokenizer(cont, add_special_tokens=False)["input_ids"]
            seqs.append(Encoded(list(prompt) + list(c), [0] * len(prompt) + [1] * len(c)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    nll, _ = summed_nll(model, seqs, pad_id=pad, batch_size=batch_size)
    if not np.isfinite(nll).all():  # argmin over NaN picks " A": a silent, wrong accuracy
        raise DataError("wmdp: the choices' log-probabilities are not finite (NaN or inf weights?)")
    pred = nll.reshape(len(rows), 4).argmin(axis=1)
    gold = np.array([r["answer"] for r in rows])
    return {"accuracy": float(np.mean(pred == gold)), "predictions": pred.tolist()}


class _Run(NamedTuple):
    """What every benchmark's runner gets: the model, its tokenizer, the output folder, the common
    options (already popped) and the benchmark's own options (each runner pops what it reads)."""

    model: Any
    tokenizer: Any
    out: Path
    limit: int | None
    source: str
    data_dir: Any
    options: dict[str, Any]


def _tofu(r: _Run) -> dict[str, Any]:
    opts = r.options
    fmt = PromptFormatter(r.tokenizer, opts.pop("template", "auto"), max_length=opts.pop("max_length", 512))
    retain_logs = opts.pop("retain_logs", None)
    where = {"limit": r.limit, "source": r.source, "data_dir": r.data_dir}
    memorization = opts.pop("memorization", True)
    retain_model = opts.pop("retain_model", None)
    mem_opts = {k: opts[k] for k in ("forget_split", "batch_size", "hub_repo") if k in opts}
    tofu.evaluate(r.model, r.tokenizer, r.out, formatter=fmt, **where, **opts)
    res = {**tofu.aggregate(r.out, retain_logs), "template": fmt.mode}
    if memorization:  # open-unlearning's extraction strength / exact memorization of the forget answers
        res.update(tofu.forget_memorization(r.model, r.tokenizer, formatter=fmt, **where, **mem_opts))
    if retain_model is not None:  # KL(retain model || model): the distance to retraining in output space
        subset = {k: opts[k] for k in ("retain_subset", "subset_seed") if k in opts}
        ref = load_model(retain_model, scan_layers=False)
        res.update(tofu.distance_to_retraining(r.model, ref, r.tokenizer, formatter=fmt, **where,
                                               **mem_opts, **subset))  # fmt: skip
    return res


def _muse(r: _Run, corpus: str) -> dict[str, Any]:
    where = {"limit": r.limit, "source": r.source, "data_dir": r.data_dir, "corpus": corpus}
    res = muse.evaluate(r.model, r.tokenizer, **where, **r.options)
    write_json_atomic(res.pop("logs"), r.out / "muse_logs.json", indent=2)
    return res


def _ppl(r: _Run) -> dict[str, Any]:
    spec = r.options.pop("data", "muse:raw/forget")
    texts = _texts(spec, r.limit, r.data_dir)
    return {"data": spec, "perplexity": perplexity(r.model, r.tokenizer, texts, **r.options)}


def _mia(r: _Run) -> dict[str, Any]:
    members = r.options.pop("members", "muse:privleak/forget")
    nonmembers = r.options.pop("nonmembers", "muse:privleak/holdout")
    p, reference = r.options.pop("gradnorm_p", None), r.options.pop("reference_model", None)
    texts = {"in": _texts(members, r.limit, r.data_dir), "out": _texts(nonmembers, r.limit, r.data_dir)}
    s = {side: text_scores(r.model, r.tokenizer, t, **r.options) for side, t in texts.items()}
    aucs = {f"auc_{name}": auc(s["in"][name], s["out"][name]) for name in SCORES if name in s["in"]}
    length = {k: r.options[k] for k in ("max_length",) if k in r.options}
    if p is not None:  # open-unlearning's mia_gradnorm
        g = {
            side: text_gradnorm_scores(r.model, r.tokenizer, t, p=float(p), **length)
            for side, t in texts.items()
        }
        aucs["auc_gradnorm"] = auc(g["in"], g["out"])
    if reference is not None:  # open-unlearning's mia_reference: the same tokenizer is assumed
        ref = load_model(reference, scan_layers=False)
        opts = {k: v for k, v in r.options.items() if k != "k"}
        ref_nll = {
            side: text_scores(ref, r.tokenizer, t, which=(), **opts)["nll"] for side, t in texts.items()
        }
        gap = {side: ref_nll[side] - s[side]["nll"] for side in texts}
        aucs["auc_ref"] = auc(gap["in"], gap["out"])
    return {"members": members, "nonmembers": nonmembers, **aucs}


def _wmdp(r: _Run) -> dict[str, Any]:
    spec = r.options.pop("data", None)
    if spec is None:
        raise DataError("wmdp needs data=<file> (or a cais/wmdp config with source='hub')")
    rows = load_wmdp(spec, source=r.source, limit=r.limit)
    return wmdp_accuracy(r.model, r.tokenizer, rows, **r.options)


def check_retain_logs_outside(
    out: str | os.PathLike, retain_logs: Any, what: str = "retain_logs", where: str = "the output folder"
) -> None:
    """A ConfigError when the retain logs are, or lie inside, the evaluation's output folder: the
    evaluation would overwrite them with the evaluated model's own logs (and report Forget Quality
    1.0, the model against itself)."""
    if retain_logs is None:
        return
    logs, folder = Path(retain_logs).expanduser().resolve(), Path(out).expanduser().resolve()
    if logs == folder or folder in logs.parents:
        raise ConfigError(
            f"{what} {retain_logs} is inside {where} {out}: the evaluation would overwrite "
            "the retain model's logs; choose another output folder"
        )


def _check_finite(results: dict[str, Any], benchmark: str, model_path: Any) -> None:
    """A NaN / inf score is a broken model, not a result (and not valid JSON): refused, naming it."""
    for key, value in results.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(
                f"the {benchmark} evaluation of {model_path} gave {key}={value}: the model's outputs "
                "are not finite (NaN or inf weights?); no results written"
            )


_RUNNERS: dict[str, Callable[[_Run], dict[str, Any]]] = {
    "tofu": _tofu, "ppl": _ppl, "mia": _mia, "wmdp": _wmdp,
    "muse_news": lambda r: _muse(r, "news"), "muse_books": lambda r: _muse(r, "books"),
}  # fmt: skip


def evaluate(
    benchmark: str,
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    model: Any = None,
    tokenizer: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``benchmark`` on the model at ``model_path`` (or a given ``model`` / ``tokenizer``) and
    write ``out_dir/results.json`` (+ the official TOFU logs). Returns the results dict."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}")
    check_options(benchmark, options)
    check_retain_logs_outside(out_dir, options.get("retain_logs"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model is None:
        # Unrolled layers: greedy decoding with a per-layer cache updates it in place, while the
        # stacked [L, ...] cache of scan_layers is rewritten every token (measured on the 2-core CPU,
        # SmolLM2-135M, batch 16: ~45 vs ~125 ms per new token). Compile time is a few seconds more.
        model = load_model(model_path, dtype=dtype, scan_layers=False)
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_path or model_path)
    # Every option given is recorded, so that e.g. a 10-row result cannot pass for an official one.
    plain = str | int | float | bool | list | None
    given = {k: v if isinstance(v, plain) else str(v) for k, v in options.items()}
    data_dir = options.pop("data_dir", None)
    source = options.pop("source", "local")
    limit = options.pop("limit", None)
    if benchmark == "tofu" and limit is None:
        limit = 300  # the official TOFU evaluation size (locuslab/tofu config/eval_everything.yaml ds_size)
    results: dict[str, Any] = {
        "benchmark": benchmark,
        "model": str(model_path),
        "limit": limit,  # rows per split; null: all
        "options": given,
    }
    results.update(_RUNNERS[benchmark](_Run(model, tokenizer, out, limit, source, data_dir, options)))
    results["seconds"] = time.perf_counter() - t0
    _check_finite(results, benchmark, model_path)
    write_json_atomic(results, out / "results.json", indent=2, allow_nan=False)
    write_marker(out, ("results.json", *WRITES.get(benchmark, ())))  # the files a later eval may replace
    return results
