"""TOFU (Maini et al., 2024): finetuning / forget / retain splits and the official evaluation.

Training rows: ``data.forget`` forget01 / forget05 / forget10 (or full / retain90 ... for
finetuning), ``data.retain`` defaulting to the matching retainXX
(:data:`sga_jax.data.tofu.RETAIN_FOR_FORGET`).
Evaluation: the four official eval-log files and :func:`sga_jax.eval.tofu.aggregate` (Forget Quality
with ``retain_logs=``), open-unlearning's forget memorization, and the distance to a retain model.
"""

from __future__ import annotations

from typing import Any

from sga_jax.benchmarks.registry import Benchmark, EvalRun, register
from sga_jax.errors import ConfigError
from sga_jax.eval.options import PROMPT_FORMATS, flag, one_of, seed, text, whole, whole_or_null

SPLITS = ("forget01", "forget05", "forget10")
# The files of sga_jax.eval.tofu.FILES (a test checks they agree), named here without importing it.
FILES = (
    "eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json",
    "eval_log_forget.json",
)  # fmt: skip


def _rows(d: Any, where: dict[str, Any], need_retain: bool) -> tuple[list[dict], list[dict] | None]:
    from sga_jax.data import tofu

    forget = tofu.load_tofu(d.forget, **where)
    if not need_retain:
        return forget, None
    name = d.retain or tofu.RETAIN_FOR_FORGET.get(d.forget)
    if name is None:
        raise ConfigError(f"data.retain: no default retain split for TOFU {d.forget!r}; set data.retain")
    return forget, tofu.load_tofu(name, **where)


def _run(r: EvalRun) -> dict[str, Any]:
    from sga_jax.data.formatting import PromptFormatter
    from sga_jax.eval import tofu
    from sga_jax.models.hf import load_model

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


def _from_data(d: Any) -> dict[str, Any]:
    """A run unlearning TOFU's forgetXX is evaluated on that split."""
    return {"forget_split": d.forget} if d.forget in SPLITS else {}


TOFU = register(
    Benchmark(
        name="tofu",
        run=_run,
        options={
            "forget_split": one_of(*SPLITS),
            "template": one_of(*PROMPT_FORMATS),
            "max_length": whole,
            "batch_size": whole,
            "generate": flag,
            "max_new_tokens": whole,
            "generation_max_length": whole,
            "generation_batch_size": whole_or_null,
            "progress": flag,
            "retain_logs": text,
            "retain_subset": whole_or_null,
            "subset_seed": seed,
            "hub_repo": text,
            "memorization": flag,
            "retain_model": text,
        },
        load_rows=_rows,
        options_from_data=_from_data,
        data_folder="tofu",
        writes=FILES,
        result_keys=("model_utility", "template"),
        # the official TOFU evaluation size (locuslab/tofu config/eval_everything.yaml ds_size)
        default_limit=300,
        aliases={f"tofu_{s}": {"forget_split": s} for s in SPLITS},
        help="""  tofu:            forget_split=forget01|forget05|forget10 (or --benchmark tofu_forget05)
                   template=auto|chat|plain|gemma3|qwen3  max_length=512  batch_size=16
                   generate=true|false  max_new_tokens=200  generation_max_length=200
                   generation_batch_size=N  memorization=true|false (extraction strength, EM)
                   retain_model=DIR (+ the per-token KL of the retain model to this one)
                   progress=true|false (a progress bar per split on stderr)""",
    )
)
