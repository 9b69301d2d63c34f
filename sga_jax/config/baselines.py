"""The schemas of the baselines the field compares against, as open-unlearning
(locuslab/open-unlearning d3d7cf9, ``src/trainer/unlearn/*.py``) has them: methods with a frozen
reference (RMU, UNDIAL, IdkDPO), with their own data (IdkNLL) or with their own forget loss (WGA,
SatImp, CE-U, PDU). Defaults from its ``configs/trainer/*.yaml`` (jax-free)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sga_jax.config.method_base import MethodConfig
from sga_jax.config.method_base import check as _check
from sga_jax.errors import ConfigError


@dataclass
class ReferenceMethodConfig(MethodConfig):
    """A method whose loss sees the frozen starting model (``needs`` has ``reference``).
    ``ref_dtype``: the dtype the reference's trainable-parameter copy is held in (null: as the
    trained parameters); with LoRA the reference is the base with the adapters off, no copy."""

    ref_dtype: str | None = None

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"reference"}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.ref_dtype in (None, "float32", "bfloat16", "float16"),
            "method.ref_dtype",
            f"must be null, float32, bfloat16 or float16, got {self.ref_dtype!r}",
        )


@dataclass
class RMUConfig(ReferenceMethodConfig):
    """RMU (Li et al. 2024, WMDP, arXiv 2403.03218; open-unlearning src/trainer/unlearn/rmu.py):
    steer the layer-``layer`` activations of forget answer tokens toward ``steering_coeff · u``
    (u a fixed random unit vector, uniform [0, 1) entries normalised) and keep the retain
    activations at the frozen model's (MSE), ``forget_weight·L_f + retain_weight·L_r``. Defaults
    from open-unlearning's configs/trainer/RMU.yaml: ``layer`` 7 (its ``module_regex``
    ``model\\.layers\\.7``), ``steering_coeff`` 2, ``forget_weight`` 1 (its ``gamma``),
    ``retain_weight`` 1 (its ``alpha``), ``trainable`` ``[".*"]`` (its ``trainable_params_regex``:
    regexes fully matched on HF parameter names such as ``model.layers.5.mlp.down_proj.weight``;
    they select layers on the stacked axis under ``scan_layers`` too). ``control_seed`` seeds u."""

    name: str = "rmu"
    layer: int = 7
    steering_coeff: float = 2.0
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    trainable: list[str] = field(default_factory=lambda: [".*"])
    control_seed: int = 0

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"retain"}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.layer >= 0, "method.layer", f"must be >= 0, got {self.layer}")
        _check(self.steering_coeff > 0, "method.steering_coeff", f"must be > 0, got {self.steering_coeff}")
        _check(bool(self.trainable), "method.trainable", "must list at least one regex")
        for pat in self.trainable:
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"method.trainable: bad regex {pat!r}: {e}") from None


@dataclass
class UNDIALConfig(ReferenceMethodConfig):
    """UNDIAL (Dong et al. 2024, arXiv 2402.10052; open-unlearning src/trainer/unlearn/undial.py
    with utils.py compute_undial_loss l. 70-99): cross-entropy of the model against the frozen
    model's softmax with the target token's logit lowered by ``beta``, on the forget answer
    tokens. Defaults from configs/trainer/UNDIAL.yaml: ``beta`` 10, ``forget_weight`` 1 (its
    ``gamma``), ``retain_weight`` 0 (its ``alpha``)."""

    name: str = "undial"
    beta: float = 10.0
    forget_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta >= 0, "method.beta", f"must be >= 0, got {self.beta}")


@dataclass
class IdkDPOConfig(ReferenceMethodConfig):
    """IdkDPO (TOFU, Maini et al. 2024; open-unlearning src/trainer/unlearn/dpo.py with utils.py
    compute_dpo_loss l. 47-67): DPO with an IdK answer as chosen and the forget answer as
    rejected, summed answer NLLs against the frozen starting model's, plus the retain NLL.
    Defaults from configs/trainer/DPO.yaml: ``beta`` 0.1, ``forget_weight`` 1 (its ``gamma``),
    ``retain_weight`` 1 (its ``alpha``). ``idk``: a file of IdK answers (one a line; null: TOFU's
    idontknow.jsonl, else a built-in refusal), one drawn per row each epoch (open-unlearning's
    QAwithIdkDataset draws one per ``__getitem__``, src/data/qa.py l. 85-89)."""

    name: str = "idk_dpo"
    beta: float = 0.1
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    idk: str | None = None

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"idk"}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta > 0, "method.beta", f"must be > 0, got {self.beta}")


@dataclass
class IdkNLLConfig(MethodConfig):
    """IdkNLL (TOFU, Maini et al. 2024, arXiv 2401.06121; locuslab/tofu dataloader.py,
    ``CustomTrainerForgetting.compute_loss``, the ``loss_type == "idk"`` branch): the NLL of an
    IdK answer under each forget question together with the retain NLL, as one token average over
    the concatenated IdK + retain batch (its single HF ``outputs.loss``). ``retain_weight`` (1)
    scales the retain tokens' summed NLL in that average. ``idk`` as :class:`IdkDPOConfig`."""

    name: str = "idk_nll"
    retain_weight: float = 1.0
    idk: str | None = None

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"idk"}


@dataclass
class _ForgetRetainConfig(MethodConfig):
    """A forget loss of its own with open-unlearning's GradDiff retain term: ``forget_weight·L_f
    + retain_weight·l_r`` (its ``gamma`` and ``alpha``; the retain NLL a token average,
    ``retain_loss_type: NLL``)."""

    forget_weight: float = 1.0
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.forget_weight >= 0, "method.forget_weight", f"must be >= 0, got {self.forget_weight}")


@dataclass
class WGAConfig(_ForgetRetainConfig):
    """WGA, weighted gradient ascent (Wang et al. 2025, arXiv 2502.19301; open-unlearning
    src/trainer/unlearn/wga.py with utils.py ``compute_wga_loss`` l. 102-115): each forget answer
    token's NLL ascended with the weight ``sg(p^beta)``, plus the retain NLL. Defaults from
    configs/trainer/WGA.yaml: ``beta`` 1, ``forget_weight`` 1 (its ``gamma``), ``retain_weight`` 1
    (its ``alpha``). (open-unlearning also deep-copies a reference model that WGA never reads.)"""

    name: str = "wga"
    beta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta >= 0, "method.beta", f"must be >= 0, got {self.beta}")


@dataclass
class SatImpConfig(_ForgetRetainConfig):
    """SatImp (Yang et al. 2025, arXiv 2505.11953; open-unlearning src/trainer/unlearn/satimp.py
    with utils.py ``compute_satimp_loss`` l. 118-134): WGA with the token weight
    ``sg(p^beta1·(1 - p)^beta2)``. Defaults from configs/trainer/SatImp.yaml: ``beta1`` 5,
    ``beta2`` 1, ``forget_weight`` 0.1 (its ``gamma``), ``retain_weight`` 1 (its ``alpha``; the
    class's own defaults, 0.1 and 1, are the other way round: the YAML is what its runs use)."""

    name: str = "satimp"
    beta1: float = 5.0
    beta2: float = 1.0
    forget_weight: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _check(value >= 0, f"method.{key}", f"must be >= 0, got {value}")


@dataclass
class CEUConfig(MethodConfig):
    """CE-U, cross-entropy unlearning (Yang et al. 2025, arXiv 2503.01224; open-unlearning
    src/trainer/unlearn/ceu.py): cross-entropy toward the model's own detached distribution with
    the answer token removed, on the forget answers only. Defaults from configs/trainer/CEU.yaml:
    ``ignore_first_n_answer_tokens`` 1 (each answer's first token is left out). ``retain_weight``
    (0, as there) adds a retain NLL."""

    name: str = "ceu"
    ignore_first_n_answer_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.ignore_first_n_answer_tokens
        _check(n >= 0, "method.ignore_first_n_answer_tokens", f"must be >= 0, got {n}")


@dataclass
class PDUConfig(_ForgetRetainConfig):
    """PDU, primal-dual unlearning (Entesari et al. 2025, arXiv 2506.05314; open-unlearning
    src/trainer/unlearn/pdu.py): minimise the forget loss ``mean (max z - mean z)²`` subject to
    ``l_r <= retain_loss_eps``, by gradient descent on ``forget_weight·L_f + λ·(l_r - eps)`` and
    a dual ascent step ``λ ← max(0, λ + dual_step_size·(l_r - eps))`` after every optimizer step once
    ``dual_warmup_epochs`` epochs have passed (its ``dual_update_upon: step``). λ starts at
    ``retain_weight`` (its ``alpha``). Defaults from configs/trainer/PDU.yaml (``dual_step_size`` 1,
    ``dual_warmup_epochs`` 5, ``forget_weight`` 1, ``retain_weight`` 1); ``retain_loss_eps`` is
    required there (``???``) and 0.3 in community/methods/PDU/run.sh's TOFU runs, taken here."""

    name: str = "pdu"
    retain_loss_eps: float = 0.3
    dual_step_size: float = 1.0
    dual_warmup_epochs: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.dual_step_size >= 0, "method.dual_step_size", f"must be >= 0, got {self.dual_step_size}")
        _check(
            self.dual_warmup_epochs >= 0,
            "method.dual_warmup_epochs",
            f"must be >= 0, got {self.dual_warmup_epochs}",
        )

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"retain"}
