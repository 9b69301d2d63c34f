"""The benchmarks sga_jax trains and evaluates on, one registration module each (tofu, muse, ppl,
mia, wmdp, jsonl, lm_harness), and their registry (:mod:`sga_jax.benchmarks.registry`): ``get(name)``,
``names()``, ``register(Benchmark(...))``. A new module here is found without being listed."""

from sga_jax.benchmarks.registry import Benchmark, EvalRun, eval_help, get, names, register, resolve

__all__ = ["Benchmark", "EvalRun", "eval_help", "get", "names", "register", "resolve"]
