"""The ``method`` section: one schema per unlearning method (the base methods, GRU over each,
K-FADE), the method names and the checks they share (jax-free, as all of :mod:`sga_jax.config`).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from sga_jax.config.baselines import (
    CEUConfig,
    IdkDPOConfig,
    IdkNLLConfig,
    PDUConfig,
    RMUConfig,
    SatImpConfig,
    UNDIALConfig,
    WGAConfig,
)
from sga_jax.config.method_base import MethodConfig, check_smoothing_rate
from sga_jax.config.method_base import check as _check
from sga_jax.errors import ConfigError

GROUPS = ("model", "method", "benchmark", "experiment")
BASE_METHODS = (
    "ga", "graddiff", "npo", "simnpo", "sga", "flat",
    "rmu", "undial", "idk_dpo", "idk_nll", "wga", "satimp", "ceu", "pdu",
)  # fmt: skip
METHODS = (*BASE_METHODS, "gru", "kfade")
# GRU's retain-gradient projection over a base method; not over PDU, whose dual variable already
# weighs the retain gradient (both would feed the transform a ``retain_grads``).
GRU_BASES = tuple(b for b in BASE_METHODS if b != "pdu")
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
    kept in ``[r_min, r_max]``, default ``[-8, 0]``; an r* above ``r_max`` takes ``fallback``:
    ``last``, the last r* in range (or ``r``), ``fixed`` (``r``) or ``clip`` (``r_max``: with the
    default 0 that step is plain GA)). ``normal_samples``: the K−1 normal samples
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
    fallback: str = "last"
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
        _check(
            self.fallback in ("last", "fixed", "clip"),
            "method.fallback",
            f"must be last, fixed or clip, got {self.fallback!r}",
        )
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
    preconditioned by the K-FAC curvature of the retain set, ``(F + Λ)⁻¹``. ``damping`` /
    ``damping_mode``: ``relative`` (default) damps each block by ``damping`` × its mean eigenvalue;
    ``absolute`` adds ``damping`` to every eigenvalue. ``trust_region`` δ and ``step_length``:
    ``gauss_newton`` (default) sizes each step so that the exact Gauss-Newton quadratic of the retain
    outputs (one jvp on a retain batch) is ``½ η² dᵀGd = δ``: a KL budget of δ per retain answer
    token, to second order; ``kfac`` sizes it with K-FAC's own quadratic model (the literal trust
    region, about 7000× too long on SmolLM2-135M). ``kl_guard``: a step whose measured retain KL
    exceeds ``kl_guard`` × δ is shrunk, with one line saying so (null: off). ``max_step_size`` caps
    η. ``fisher``: ``sampled`` (true Fisher) or ``empirical``. ``curvature_batches``: how many retain
    batches of ``train.batch_size`` rows estimate the curvature. The update Δθ is saved as
    ``delta.safetensors`` for ``sga-jax reapply``."""

    name: str = "kfade"
    steps: int = 3
    damping: float = 0.1
    damping_mode: str = "relative"
    trust_region: float = 1e-2
    step_length: str = "gauss_newton"
    kl_guard: float | None = 2.0
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
        _check(
            self.damping_mode in ("relative", "absolute"),
            "method.damping_mode",
            f"must be relative or absolute, got {self.damping_mode!r}",
        )
        _check(self.trust_region > 0, "method.trust_region", f"must be > 0, got {self.trust_region}")
        _check(
            self.step_length in ("gauss_newton", "kfac"),
            "method.step_length",
            f"must be gauss_newton or kfac, got {self.step_length!r}",
        )
        _check(
            self.kl_guard is None or self.kl_guard >= 1,
            "method.kl_guard",
            f"must be >= 1 (a factor of method.trust_region) or null, got {self.kl_guard}",
        )
        _check(
            self.max_step_size is None or self.max_step_size > 0,
            "method.max_step_size",
            f"must be > 0 or null, got {self.max_step_size}",
        )
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
    "rmu": RMUConfig,
    "undial": UNDIALConfig,
    "idk_dpo": IdkDPOConfig,
    "idk_nll": IdkNLLConfig,
    "wga": WGAConfig,
    "satimp": SatImpConfig,
    "ceu": CEUConfig,
    "pdu": PDUConfig,
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
            raise ConfigError(f"method.base: GRU needs a base method, one of {', '.join(GRU_BASES)}")
        if base == "pdu":
            raise ConfigError(
                "method.base: GRU does not go over pdu: PDU's dual variable already weighs the retain "
                f"gradient; choose one of {', '.join(GRU_BASES)}"
            )
        if base not in _BASE_SCHEMAS:
            raise ConfigError(
                f"method.base: unknown base method {base!r}; choose one of {', '.join(GRU_BASES)}"
            )
        return _gru_schema(base)
    hint = difflib.get_close_matches(str(name), METHODS, n=1)
    raise ConfigError(
        f"method.name: unknown method {name!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; choose one of {', '.join(METHODS)}"
    )
