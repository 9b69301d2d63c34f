"""optax ``GradientTransformationExtraArgs`` for unlearning: ``sga``, ``gru``, ``kfade``.

Each is a factory in optax's style (keyword-only extra args, NamedTuple state) and composes with
``optax.chain``. Imported lazily so each transform's module loads only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "sga": "sga_jax.transforms.sga",
    "SGAState": "sga_jax.transforms.sga",
    "gru": "sga_jax.transforms.gru",
    "GRUState": "sga_jax.transforms.gru",
    "kfade": "sga_jax.transforms.kfade",
    "KFADEState": "sga_jax.transforms.kfade",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sga_jax.transforms' has no attribute {name!r}")
