"""sga_jax: LLM unlearning in JAX/Flax.

The stable public API (docs/design.md)::

    import sga_jax
    model = sga_jax.load_model(path, dtype="float32")   # HF dir (llama / opt / phi) or a .gguf file
    logits = model(input_ids, attention_mask=None)       # [B, T, V]
    sga_jax.save_model(model, out_dir)
    tok = sga_jax.load_tokenizer(path)
    sga_jax.objectives.sga_loss(nll_forget, nll_normal, r)
    sga_jax.transforms.sga(...), .gru(...), .kfade(...)
    sga_jax.eval.tofu.aggregate(unlearned_dir, retain_dir)

Submodules are imported lazily so that ``import sga_jax`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_FUNCTIONS = {
    "load_model": "sga_jax.models.hf",
    "save_model": "sga_jax.models.hf",
    "load_tokenizer": "sga_jax.models.hf",
    "unlearn": "sga_jax.runner",
}
_LAZY_MODULES = {
    "transforms",
    "kernels",
    "models",
    "data",
    "eval",
    "curvature",
    "train",
    "runner",
    "methods",
    "errors",
    "paths",
    "distributed",
    "objectives",
    "logprobs",
    "kfac_math",
    "reapply",
    "config",
}

__all__ = sorted([*_LAZY_FUNCTIONS, *_LAZY_MODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"sga_jax.{name}")
    raise AttributeError(f"module 'sga_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
