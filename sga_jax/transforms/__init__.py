"""optax ``GradientTransformationExtraArgs`` for unlearning: ``sga``, ``gru``, ``kfade``, ``primal_dual``.

Each is a factory in optax's style (keyword-only extra args, NamedTuple state) and composes with
``optax.chain``. Imported eagerly: a lazy ``__getattr__`` would let the submodules (``sga.py`` …)
shadow the factories of the same name on the package.
"""

from sga_jax.transforms.gru import GRUState, gru
from sga_jax.transforms.kfade import KFADEState, kfade
from sga_jax.transforms.primal_dual import PrimalDualState, dual_record, primal_dual
from sga_jax.transforms.sga import SGAState, sga

__all__ = [
    "GRUState",
    "KFADEState",
    "PrimalDualState",
    "SGAState",
    "dual_record",
    "gru",
    "kfade",
    "primal_dual",
    "sga",
]
