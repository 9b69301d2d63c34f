"""Flax NNX ports of the causal LMs sga_jax supports and their HF loaders (Llama, Mistral, Qwen2,
Qwen3, Gemma, Gemma 2, Gemma 3, OPT, Phi, Phi-3).

``from_config(hf_config, rngs=..., dtype=...)`` builds a randomly initialised model from a
transformers config (object or ``config.json`` dict); ``sga_jax.models.hf.load_model`` loads weights.
"""

from __future__ import annotations

import importlib
from typing import Any

from flax import nnx

from sga_jax.errors import ModelLoadError
from sga_jax.models.layers import activation

# model_type -> (module, config class, model class)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "gemma": ("sga_jax.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("sga_jax.models.gemma2", "Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("sga_jax.models.gemma3", "Gemma3Config", "Gemma3ForCausalLM"),  # its text part
    "gemma3_text": ("sga_jax.models.gemma3", "Gemma3Config", "Gemma3ForCausalLM"),
    "llama": ("sga_jax.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("sga_jax.models.mistral", "MistralConfig", "MistralForCausalLM"),
    "opt": ("sga_jax.models.opt", "OPTConfig", "OPTForCausalLM"),
    "phi": ("sga_jax.models.phi", "PhiConfig", "PhiForCausalLM"),
    "phi3": ("sga_jax.models.phi3", "Phi3Config", "Phi3ForCausalLM"),
    "qwen2": ("sga_jax.models.qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("sga_jax.models.qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
}
# model_types refused with a reason of their own (not merely absent from the registry).
REFUSED: dict[str, str] = {
    "qwen3_moe": "Qwen3-MoE (mixture-of-experts MLPs with a router) is not supported: sga_jax ports "
    "dense models only; use a dense Qwen3 (model_type qwen3)",
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
    if model_type in REFUSED:
        raise ModelLoadError(REFUSED[model_type])
    if model_type not in _REGISTRY:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_sizes(hf)
    module, config_cls, model_cls = _REGISTRY[model_type]
    mod = importlib.import_module(module)
    try:
        config = getattr(mod, config_cls).from_hf(hf)
    except KeyError as e:
        raise ModelLoadError(f"{model_type} config is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{model_type} config has a malformed field: {e}") from None
    activation(getattr(config, "hidden_act", None) or getattr(config, "activation_function", "silu"))
    if config.hidden_size % config.num_attention_heads and not hf.get("head_dim"):
        raise ModelLoadError(
            f"hidden_size {config.hidden_size} is not a multiple of "
            f"num_attention_heads {config.num_attention_heads}"
        )
    return config, getattr(mod, model_cls)


# Integer sizes a config.json may give; each must be a whole number >= 1 when present.
_SIZE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "word_embed_proj_dim",
)  # fmt: skip


def _check_sizes(hf: dict[str, Any]) -> None:
    for key in _SIZE_FIELDS:
        v = hf.get(key)
        if v is None and key in ("num_key_value_heads", "head_dim", "word_embed_proj_dim"):
            continue  # optional: derived from the others
        if key in hf and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ModelLoadError(f"config.json: {key} must be a whole number >= 1, got {v!r}")


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
