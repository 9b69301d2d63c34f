"""Flax NNX ports of the causal LMs sga_jax supports (Llama, OPT, Phi) and their HF loaders.

``from_config(hf_config, rngs=..., dtype=...)`` builds a randomly initialised model from a
transformers config (object or ``config.json`` dict); ``sga_jax.models.hf.load_model`` loads weights.
"""

from __future__ import annotations

import importlib
from typing import Any

from flax import nnx

from sga_jax.errors import ModelLoadError

# model_type -> (module, config class, model class)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "llama": ("sga_jax.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "opt": ("sga_jax.models.opt", "OPTConfig", "OPTForCausalLM"),
    "phi": ("sga_jax.models.phi", "PhiConfig", "PhiForCausalLM"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_REGISTRY))


def _hf_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ModelLoadError(f"expected a transformers config or a dict, got {type(hf_config).__name__}")


def resolve(hf_config: Any) -> tuple[Any, type]:
    """HF config -> (our config dataclass instance, model class); refuses unknown / remote-code ones."""
    hf = _hf_dict(hf_config)
    if hf.get("auto_map") or hf.get("trust_remote_code"):
        raise ModelLoadError(
            "this config asks for remote code (auto_map / trust_remote_code); sga_jax never runs "
            f"remote code. Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model_type = hf.get("model_type")
    if model_type not in _REGISTRY:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    module, config_cls, model_cls = _REGISTRY[model_type]
    mod = importlib.import_module(module)
    try:
        config = getattr(mod, config_cls).from_hf(hf)
    except KeyError as e:
        raise ModelLoadError(f"{model_type} config is missing the field {e.args[0]!r}") from None
    return config, getattr(mod, model_cls)


def from_config(
    hf_config: Any,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: Any = "float32",
    param_dtype: Any = None,
    scan_layers: bool = False,
    remat: str | None = None,
    attention: str = "auto",
):
    """A randomly initialised model for ``hf_config`` (a transformers config or a config.json dict)."""
    config, cls = resolve(hf_config)
    return cls(
        config,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
        dtype=dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
        remat=remat,
        attention=attention,
    )


__all__ = ["SUPPORTED_MODEL_TYPES", "from_config", "resolve"]
