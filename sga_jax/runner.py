"""The runner: a config in, a trained (unlearned) model, its metrics and its evaluation out.

``prepare(cfg)`` loads and validates everything and writes nothing; ``run(cfg)`` checks the output
folder, prepares, then hands the prepared model and data to the method's driver (the training loop
of :mod:`sga_jax.train`, or a method's own driver such as K-FADE's) and evaluates the exported
model; ``unlearn(...)`` is ``run`` from a YAML file / dict / overrides, the Python twin of
``sga-jax unlearn``::

    result = sga_jax.unlearn("configs/experiment/tofu_sga.yaml", "model.path=out/target", train__steps=10)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from sga_jax import benchmarks
from sga_jax import config as C
from sga_jax.data.formatting import PromptFormatter
from sga_jax.data.normal_samples import normal_index
from sga_jax.data.splits import (
    check_forget_answers,
    drop_forget_copies,
    encode,
    flat_templates,
    idk_answers,
    load_normal_file,
    load_rows,
    prepare_forget_rows,
    template_rows,
)
from sga_jax.data.tofu import load_tofu
from sga_jax.errors import ConfigError, DataError
from sga_jax.eval.run import evaluate as run_eval
from sga_jax.eval.tofu import read_logs
from sga_jax.kfade_driver import run_kfade
from sga_jax.logprobs import batched_nll, check_positions
from sga_jax.models import hf
from sga_jax.models.locate import resolve_model_path
from sga_jax.models.lora import apply_lora
from sga_jax.models.sharding import make_mesh
from sga_jax.paths import benchmark_dir
from sga_jax.rundir import check_output_dir, locked, start_afresh, write_text
from sga_jax.train import RunResult, StepCache, TrainData, total_steps, train_loop

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Prepared:
    """Everything a run needs, loaded and validated; nothing written yet."""

    cfg: C.RunConfig
    model: Any
    tokenizer: Any
    data: TrainData
    forget_rows: list[dict]
    retain_rows: list[dict] | None
    mesh: Any = None
    pairing: list[list[int]] | None = None


# ---------------------------------------------------------------------------------- preparation


def run_mesh(cfg: C.RunConfig, devices=None):
    """The run's device mesh (None without ``mesh:``) over ``devices`` (default ``jax.devices()``;
    ``sga-jax plan`` passes a TPU topology's); checks that a micro-batch splits over it."""
    if cfg.mesh is None:
        return None
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    width = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % width:
        raise ConfigError(
            f"train.batch_size / train.grad_accum = {micro} rows per micro-batch must be a multiple of "
            f"the mesh's data x fsdp = {width}"
        )
    return mesh


def needs(cfg: C.RunConfig) -> frozenset[str]:
    """The data a run trains on besides the forget rows (the method schema's ``needs``; none when
    finetuning)."""
    return cfg.method.needs if cfg.mode == "unlearn" else frozenset()


def _epochs_run(cfg: C.RunConfig, num_forget: int) -> int:
    """How many (partial) epochs over the forget rows the run's steps take."""
    return math.ceil(total_steps(cfg.train, num_forget) * cfg.train.batch_size / num_forget)


def _method_rows(cfg: C.RunConfig, fmt, forget_rows: list[dict], forget: Batch) -> dict[str, Any]:
    """FLAT's template rows and SGA's file-given normal rows, aligned to every forget row."""
    need, m, out = needs(cfg), cfg.method, {}
    if need & {"template", "normal", "idk"} and forget["input_ids"].shape[0] != len(forget_rows):
        raise DataError(
            f"data.forget: {len(forget_rows) - forget['input_ids'].shape[0]} rows could not be encoded; "
            "FLAT templates / IdK answers / SGA normal-sample files are aligned to every row: fix or "
            "drop those rows"
        )
    if "idk" in need:  # an IdK answer per forget row, drawn anew each epoch (open-unlearning qa.py l. 85-89)
        out["idk_epochs"], rows = template_rows(
            forget_rows,
            idk_answers(getattr(m, "idk", None), cfg.data),
            per_epoch=True,
            epochs=_epochs_run(cfg, len(forget_rows)),
            seed=cfg.train.seed + 1,
        )
        out["idk"] = encode(rows, fmt, source="IdK answers", strict=True)
    if "template" in need:
        assert isinstance(m, C.FLATConfig)
        steps = total_steps(cfg.train, len(forget_rows))
        out["template_epochs"], rows = template_rows(
            forget_rows,
            flat_templates(m, cfg.data),
            per_epoch=m.template_sampling == "epoch",
            epochs=math.ceil(steps * cfg.train.batch_size / len(forget_rows)),
            seed=cfg.train.seed,
        )
        out["template"] = encode(rows, fmt, source="FLAT templates", strict=True)
    if "normal" in need and isinstance(m, C.SGAConfig) and m.normal_samples == "file":
        assert m.normal_file is not None
        rows = load_normal_file(m.normal_file, len(forget_rows), m.k - 1)
        out["normal"] = encode(rows, fmt, source=f"method.normal_file ({m.normal_file})", strict=True)
    return out


def attach_method_data(model, data: TrainData, m: C.MethodConfig, need: frozenset[str], *, seed: int) -> None:
    """Fill in what needs the model: SGA's normal-sample index (``normal``) and NPO's reference
    NLLs (``ref_nll``: the *summed* answer NLL under the starting model, open-unlearning's
    compute_dpo_loss with the frozen ref_model, src/trainer/utils.py l. 61-64)."""
    if "normal" in need:
        data.normal_index = normal_index(model, data, m, seed=seed)
    if "ref_nll" in need:
        data.ref_nll = batched_nll(model, data.forget, reduction="sum")


def prepare(cfg: C.RunConfig) -> Prepared:
    """Load the model, tokenizer and data of ``cfg`` and build the :class:`TrainData`; raises an
    :class:`~sga_jax.errors.SgaJaxError` on any problem and writes nothing."""
    need = needs(cfg)
    forget_rows, retain_rows = load_rows(cfg.data, need_retain="retain" in need)
    check_forget_answers(forget_rows)  # row checks first: before a model is converted or loaded
    kept = drop_forget_copies(forget_rows, retain_rows) if retain_rows else []
    mesh = run_mesh(cfg)
    path = resolve_model_path(cfg.model.path)
    tokenizer = hf.load_tokenizer(cfg.model.tokenizer or path)
    fmt = PromptFormatter(tokenizer, cfg.data.prompt_format, cfg.data.max_length)
    forget_rows = prepare_forget_rows(cfg.data, forget_rows, tokenizer)  # MUSE-Books: the raw text's chunks
    forget = encode(forget_rows, fmt, source=f"data.forget ({cfg.data.forget})")
    retain = None
    if retain_rows:
        retain = encode([retain_rows[j] for j in kept], fmt, source=f"data.retain ({cfg.data.retain})")
    data = TrainData(forget=forget, retain=retain, **_method_rows(cfg, fmt, forget_rows, forget))
    model = hf.load_model(
        path,
        cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        mesh=mesh,
        scan_layers=cfg.model.scan_layers,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
    )
    for name in ("forget", "retain", "normal", "template"):  # OPT: rows past its position table
        batch = getattr(data, name)
        if batch is not None:
            longest = int(np.asarray(batch["attention_mask"]).sum(axis=1).max())
            check_positions(model, longest, f"data.{name} rows", "set data.max_length")
    if cfg.model.lora is not None:  # adapters on the loaded model; only they train (train.split_model)
        apply_lora(model, cfg.model.lora, nnx.Rngs(cfg.train.seed), mesh=mesh)
    attach_method_data(model, data, cfg.method, need, seed=cfg.train.seed)
    layer = getattr(cfg.method, "layer", None)
    if cfg.mode == "unlearn" and layer is not None and not 0 <= layer < model.config.num_layers:
        raise ConfigError(f"method.layer={layer}: the model has {model.config.num_layers} layers (0..)")
    return Prepared(cfg, model, tokenizer, data, forget_rows, retain_rows, mesh, _pairing(data, kept))


def _pairing(data: TrainData, kept: list[int]) -> list[list[int]] | None:
    """SGA's pairing as saved with the run: rows of the retain *file* (``kept``: the retain rows
    left after forget rows were dropped), or of ``method.normal_file``."""
    if data.normal_index is None:
        return None
    idx = data.normal_index.tolist()
    if data.normal is not None or data.retain is None or data.retain["input_ids"].shape[0] != len(kept):
        return idx
    return [[kept[j] for j in row] for row in idx]


# ------------------------------------------------------------------------------------------ run


def check_retain_logs(path: str, options: Mapping[str, Any] | None = None) -> None:
    """The retain model's TOFU eval logs must be readable and, given the TOFU evaluation's
    ``options`` (forget split, limit, local data), cover as many forget questions as it will score:
    checked before a run or an evaluation, not after it."""
    logs = read_logs(path)
    if options is None or options.get("source", "local") != "local":
        return
    split = options.get("forget_split", "forget10")
    limit = options.get("limit") or 300  # the official TOFU evaluation size (sga_jax.eval.run)
    rows = load_tofu(f"{split}_perturbed", data_dir=options.get("data_dir"), limit=limit)
    theirs = len(logs["eval_log_forget.json"].get("avg_gt_loss", {}))
    if theirs != len(rows):
        raise DataError(
            f"retain logs {path} cover {theirs} forget questions, this evaluation {len(rows)} "
            f"({split}, limit {limit}): Forget Quality needs the same forget split and limit on both sides"
        )


def check_before_training(cfg: C.RunConfig) -> None:
    """What would otherwise fail only after the whole run: the retain logs of the final evaluation,
    and a float16 run on the CPU (XLA:CPU has no float16 matmul with float32 accumulation, so the
    first step would raise deep inside the compiled step)."""
    retain_logs = eval_options(cfg).get("retain_logs")  # eval.retain_logs or eval.options.retain_logs
    if cfg.eval.benchmark == "tofu" and retain_logs:
        logs = Path(retain_logs).expanduser().resolve()
        where = (Path(cfg.output_dir).expanduser() / "eval").resolve()
        if logs == where or where in logs.parents:
            raise ConfigError(
                f"eval.retain_logs {retain_logs} is inside the run's evaluation folder {where}: "
                "it would overwrite the retain model's logs; use another output_dir"
            )
        try:
            check_retain_logs(retain_logs, eval_options(cfg))
        except DataError as e:
            raise ConfigError(f"eval.retain_logs: {e}") from None
    half = [k for k in ("dtype", "param_dtype") if getattr(cfg.model, k) == "float16"]
    if half and jax.default_backend() == "cpu":
        raise ConfigError(
            f"model.{half[0]}=float16 does not run on the CPU (XLA:CPU has no float16 matmul with "
            "float32 accumulation); use bfloat16 or float32 there, float16 on a GPU"
        )


def eval_options(cfg: C.RunConfig) -> dict[str, Any]:
    """The options of the evaluation after a run (``sga_jax.eval.run.evaluate``): ``eval.options``
    plus what the run's own data settings imply (retain logs, TOFU forget split, hub source,
    data folder)."""
    opts = dict(cfg.eval.options)
    if cfg.eval.retain_logs:
        opts.setdefault("retain_logs", cfg.eval.retain_logs)
    if cfg.eval.benchmark == "none":
        return opts
    bench = benchmarks.get(cfg.eval.benchmark, kind="eval", key="eval.benchmark")
    if cfg.data.benchmark == bench.name and bench.options_from_data:  # e.g. TOFU's forget split
        for key, value in bench.options_from_data(cfg.data).items():
            opts.setdefault(key, value)
    if cfg.data.source == "hub" and bench.data_folder:
        opts.setdefault("source", "hub")
        if cfg.data.hub_repo and cfg.eval.benchmark == cfg.data.benchmark:  # the user's copy, as in training
            opts.setdefault("hub_repo", cfg.data.hub_repo)
    if cfg.data.data_dir and bench.data_folder:
        opts.setdefault("data_dir", benchmark_dir(cfg.data.data_dir, bench.data_folder))
    return opts


# Methods without a training loop and their drivers ``(cfg, locked out dir, prepared) -> RunResult``.
DRIVERS: dict[type, Callable[[C.RunConfig, Path, Prepared], RunResult]] = {C.KFADEConfig: run_kfade}


def run(
    cfg: C.RunConfig,
    *,
    prepared: Prepared | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
    step_cache: StepCache | None = None,
) -> RunResult:
    """Validate and load everything, then create ``cfg.output_dir`` and train (or run the method's
    own driver), export the model to ``output_dir/model`` and evaluate when ``cfg.eval.benchmark``
    is set. ``evaluate`` / ``eval_every``: an in-loop evaluation (see :func:`sga_jax.train.train_loop`)."""
    out = check_output_dir(cfg)
    check_before_training(cfg)
    prepared = prepared or prepare(cfg)
    driver = DRIVERS.get(type(cfg.method)) if cfg.mode == "unlearn" else None
    with locked(out):
        if cfg.train.resume is False:
            start_afresh(out)
        write_text(out / "config.yaml", C.to_yaml(cfg))
        if driver is not None:
            result = driver(cfg, out, prepared)
        else:
            if prepared.pairing is not None:
                pairing = json.dumps({"forget_to_retain_rows": prepared.pairing})
                write_text(out / "normal_samples.json", pairing)
            result = train_loop(
                prepared.model, prepared.data, cfg, out, evaluate=evaluate, eval_every=eval_every,
                tokenizer=prepared.tokenizer, mesh=prepared.mesh, step_cache=step_cache,
            )  # fmt: skip
    if result.model_dir is not None and cfg.eval.benchmark != "none":
        result.eval = run_eval(cfg.eval.benchmark, result.model_dir, out / "eval", **eval_options(cfg))
    return result


def unlearn(
    config: str | os.PathLike | Mapping[str, Any] | C.RunConfig | None = None,
    /,
    *overrides: str,
    **options: Any,
) -> RunResult:
    """Run an unlearning (or finetuning) job; the Python twin of ``sga-jax unlearn``.

    ``config``: a YAML file, a nested dict, a :class:`~sga_jax.config.RunConfig` or None (defaults);
    ``overrides``: ``"method.r=-0.8"``-style strings; ``options``: dotted keys with ``__`` for dots
    (``method__r=-0.8``) or whole sections (``method={"name": "npo"}``)::

        sga_jax.unlearn("configs/experiment/tofu_sga.yaml", "model.path=out/target", train__steps=10)
    """
    extra = [
        f"{k.replace('__', '.')}={_yaml_value(v)}" for k, v in options.items() if not isinstance(v, Mapping)
    ]
    sections = {k: dict(v) for k, v in options.items() if isinstance(v, Mapping)}
    if isinstance(config, C.RunConfig):
        base: Any = C.to_dict(config)
        files: list = []
    elif isinstance(config, Mapping):
        base, files = dict(config), []
    else:
        base, files = None, ([config] if config is not None else [])
    if sections:
        base = OmegaConf.merge(OmegaConf.create(base or {}), sections)
    cfg = C.compose(files, [*overrides, *extra], base=base)
    return run(cfg)


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ",".join(_yaml_value(x) for x in v) + "]"
    return str(v)


__all__ = [
    "DRIVERS",
    "Prepared",
    "attach_method_data",
    "check_before_training",
    "check_retain_logs",
    "eval_options",
    "needs",
    "prepare",
    "run",
    "run_mesh",
    "unlearn",
]
