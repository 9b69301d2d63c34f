"""Typed run configuration: OmegaConf structured configs built from dataclasses.

A run is described by one :class:`RunConfig` with the sections ``model``, ``method``, ``data``,
``train``, ``mesh`` and ``eval``. It is composed, in order, from

1. the dataclass defaults of the schemas;
2. YAML files (``--config FILE``; a file may list ``defaults: [method/sga, model/smollm2, ...]``,
   resolved against the ``configs/`` folder and merged first);
3. command-line overrides: dotted ``section.key=value`` (``method.r=-0.8``) or a group choice
   ``method=npo`` / ``benchmark=tofu_forget05`` / ``model=smollm2`` that merges that YAML file.

The ``method`` section's schema depends on ``method.name`` (an SGA section has ``r`` and ``k``, an NPO
section ``beta``), so a key that the chosen method does not have is an error, as is a wrong type or
an out-of-range value. Every such problem raises :class:`sga_jax.errors.ConfigError` with one line
that names the key.

The schemas live in :mod:`~sga_jax.config.methods` (the ``method`` section: the paper methods,
GRU and K-FADE; the baselines in :mod:`~sga_jax.config.baselines`, the shared fields in
:mod:`~sga_jax.config.method_base`) and
:mod:`~sga_jax.config.sections` (the others and :class:`RunConfig`), composition in
:mod:`~sga_jax.config.loading`; this package re-exports them all, so ``config.X`` is the name to use.
Nothing here imports JAX.
"""

from __future__ import annotations

# The package's public names (and the constants other modules read), re-exported from their modules.
from sga_jax.config.baselines import (
    CEUConfig,
    IdkDPOConfig,
    IdkNLLConfig,
    PDUConfig,
    ReferenceMethodConfig,
    RMUConfig,
    SatImpConfig,
    UNDIALConfig,
    WGAConfig,
)
from sga_jax.config.loading import compose, configs_root, to_dict, to_yaml
from sga_jax.config.method_base import LOSS_REDUCTIONS, MethodConfig, check_smoothing_rate
from sga_jax.config.methods import (
    BASE_METHODS,
    FLAT_DIVERGENCE_ALIASES,
    FLAT_DIVERGENCES,
    GROUPS,
    GRU_BASES,
    METHODS,
    FLATConfig,
    GAConfig,
    GradDiffConfig,
    GRUMixin,
    KFADEConfig,
    NPOConfig,
    SGAConfig,
    SimNPOConfig,
    method_schema,
)
from sga_jax.config.sections import (
    ATTENTION_CHOICES,
    LORA_SAVE,
    LORA_TARGETS,
    REMAT_CHOICES,
    DataConfig,
    EvalConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "ATTENTION_CHOICES",
    "BASE_METHODS",
    "CEUConfig",
    "DataConfig",
    "EvalConfig",
    "FLATConfig",
    "FLAT_DIVERGENCES",
    "FLAT_DIVERGENCE_ALIASES",
    "GAConfig",
    "GROUPS",
    "GRUMixin",
    "GRU_BASES",
    "GradDiffConfig",
    "IdkDPOConfig",
    "IdkNLLConfig",
    "KFADEConfig",
    "LORA_SAVE",
    "LORA_TARGETS",
    "LOSS_REDUCTIONS",
    "LoRAConfig",
    "METHODS",
    "MeshConfig",
    "MethodConfig",
    "ModelConfig",
    "NPOConfig",
    "PDUConfig",
    "REMAT_CHOICES",
    "RMUConfig",
    "ReferenceMethodConfig",
    "RunConfig",
    "SGAConfig",
    "SatImpConfig",
    "SimNPOConfig",
    "TrainConfig",
    "UNDIALConfig",
    "WGAConfig",
    "check_smoothing_rate",
    "compose",
    "configs_root",
    "method_schema",
    "to_dict",
    "to_yaml",
]
