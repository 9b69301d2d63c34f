"""Fused / chunked kernels with plain-JAX references. Imported as ``sga_jax.kernels``.

``token_logprobs(hidden [N, d], weight [d, V], labels [N], bias=None, *, implementation="chunked")``
gives the per-token log-probability of the labels without materialising the ``[N, V]`` logits.
"""

from sga_jax.kernels.logprob import (
    DEFAULT_CHUNK_SIZE,
    IMPLEMENTATIONS,
    chunked_token_logprobs,
    reference_token_logprobs,
    token_logprobs,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IMPLEMENTATIONS",
    "chunked_token_logprobs",
    "reference_token_logprobs",
    "token_logprobs",
]
