"""Fused / chunked kernels with plain-JAX references. Imported as ``sga_jax.kernels``."""
