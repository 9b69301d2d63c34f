"""lm-evaluation-harness tasks (MMLU, WMDP-Bio / Cyber, ...) through sga_jax's lm-eval backend
(:mod:`sga_jax.eval.lm_eval_backend`; ``pip install "sga-jax[lm_eval]"``): ``sga-jax eval MODEL
-b lm_eval tasks=[mmlu,wmdp_bio]`` (or ``--tasks mmlu,wmdp_bio``). The task data comes from the hub
through lm-eval, or from ``include_path=`` task YAMLs. Results: ``<task>/<metric>`` keys (e.g.
``wmdp_bio/acc``) and lm-eval's full results in ``lm_eval_results.json``.
"""

from __future__ import annotations

from typing import Any

from sga_jax.benchmarks.registry import Benchmark, EvalRun, register
from sga_jax.eval.options import flag, names, seed, text, whole

_MODEL_ARGS = ("max_length", "max_gen_toks", "dtype", "mesh", "add_bos_token", "tokenizer")


def _run(r: EvalRun) -> dict[str, Any]:
    from sga_jax.eval.lm_eval_backend import run_lm_eval

    opts = r.options
    tasks = opts.pop("tasks", None)
    if tasks is None:
        from sga_jax.errors import ConfigError

        raise ConfigError("lm_eval needs tasks=[name,...] (or --tasks a,b): lm-eval task names, e.g. mmlu")
    tasks = [t for t in tasks.split(",") if t] if isinstance(tasks, str) else list(tasks)
    model_args = {k: opts.pop(k) for k in _MODEL_ARGS if k in opts}
    scores = run_lm_eval(r.model_path, tasks, out_dir=r.out, limit=r.limit, **opts, **model_args)
    return {"tasks": tasks, **scores}


LM_EVAL = register(
    Benchmark(
        name="lm_eval",
        run=_run,
        options={
            "tasks": names,
            "num_fewshot": seed,
            "batch_size": whole,
            "include_path": text,
            "log_samples": flag,
            "max_length": whole,
            "max_gen_toks": whole,
            "dtype": text,
            "mesh": text,
            "add_bos_token": flag,
            "tokenizer": text,
        },
        writes=("lm_eval_results.json",),
        result_keys=("tasks",),
        loads_model=False,
        help="""  lm_eval:         tasks=[mmlu,wmdp_bio] or --tasks mmlu,wmdp_bio (extra sga-jax[lm_eval])
                   num_fewshot=N  batch_size=8  include_path=DIR (task YAMLs)  max_length=N  mesh=fsdp:2
                   log_samples=true|false  (limit=N: examples per task)""",
    )
)
