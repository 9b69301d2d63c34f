"""What every ``method`` section has (:class:`MethodConfig`) and the checks the schemas share
(jax-free, as all of :mod:`sga_jax.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from sga_jax.errors import ConfigError


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_smoothing_rate(r: float, what: str = "SGA smoothing rate r") -> None:
    """SGA's smoothing rate must be <= 1 (arXiv 2510.22376): the one check, used by the config
    schema, the ``sga`` transform factory and ``objectives.sga_loss`` (for a Python / numpy r; a
    traced r comes from a schedule clipped to ``r_max <= 1``)."""
    if r > 1:
        raise ConfigError(f"{what} must be <= 1 (arXiv 2510.22376), got {r}")


# ---------------------------------------------------------------------------------------- methods


LOSS_REDUCTIONS = ("token", "sequence")


@dataclass
class MethodConfig:
    """Fields every method has. ``retain_weight``: weight of a plain NLL term on the retain set
    added to the unlearning loss (GradDiff's α; 0 disables it). ``loss_reduction``: how the plain
    NLL terms (GA's / GradDiff's forget term, every retain term) average over a batch: ``token``
    (over all answer tokens of the batch, open-unlearning's / HF's ``outputs.loss``; the baselines'
    default) or ``sequence`` (the mean over rows of per-row token means). NPO's and SimNPO's forget
    terms, SGA and FLAT have their own per-row forms and are averaged over rows. ``recipe``: the
    training recipe of the code the method follows, ``configs/recipe/<recipe>.yaml`` (its ``train``
    keys, under every ``train`` key a file or override sets, wherever it comes; null: none)."""

    name: str = "sga"
    retain_weight: float = 0.0
    loss_reduction: str = "token"
    recipe: str | None = None

    @property
    def needs(self) -> frozenset[str]:
        """Which data the method trains on besides the forget rows: ``retain`` (the retain pool),
        ``normal`` (SGA's normal samples), ``template`` (FLAT's template rows), ``idk`` (an IdK
        answer under each forget row's question, drawn anew each epoch), ``ref_nll`` (the
        starting model's summed forget NLLs), ``reference`` (the frozen starting model, handed to
        the loss as ``ref``). The runner loads exactly these."""
        return frozenset({"retain"} if self.retain_weight else ())

    def __post_init__(self) -> None:
        check(self.retain_weight >= 0, "method.retain_weight", f"must be >= 0, got {self.retain_weight}")
        check(
            self.loss_reduction in LOSS_REDUCTIONS,
            "method.loss_reduction",
            f"must be token or sequence, got {self.loss_reduction!r}",
        )
