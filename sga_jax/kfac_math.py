"""Kronecker-factored curvature algebra for one dense layer (pure functions, float32).

Layout: our kernels are ``[in, out]`` (``y = x @ W``), so the gradient of a layer is
``∇W = Σ_t a_t g_tᵀ`` (``[in, out]``) with ``a`` the layer input (a 1 appended when the layer has a
bias: ``W̃ = [W; b]``, ``[in+1, out]``) and ``g`` the gradient w.r.t. the layer output. K-FAC
(Martens & Grosse 2015, arXiv 1503.05671, eq. 1) approximates the layer's Fisher / GGN block by
``A ⊗ G`` with ``A = E[a aᵀ]``, ``G = E[g gᵀ]``; acting on a matrix ``V [in, out]`` this is
``V ↦ A V G`` (row-major ``vec``). With ``A = Q_A diag(λ_A) Q_Aᵀ`` and ``G = Q_G diag(λ_G) Q_Gᵀ``::

    (A ⊗ G + λI)⁻¹ V = Q_A [(Q_Aᵀ V Q_G) ⊘ (λ_A λ_Gᵀ + λ)] Q_Gᵀ

which is docs/design.md's ``Q_G[(Q_Gᵀ ∇W Q_A) ⊘ (λ_G λ_Aᵀ + λ)]Q_Aᵀ`` written for the transposed
``[in, out]`` kernel. EK-FAC (George et al. 2018, arXiv 1806.03884, eq. 10) replaces the Kronecker
eigenvalues ``λ_A λ_Gᵀ`` by ``S = E[(Q_Aᵀ ∇W Q_G)²]`` re-estimated in the same eigenbasis.

Every function accepts optional leading stack axes (``[L, n, n]`` factors of scanned layers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class KronEigen(NamedTuple):
    """Eigendecomposition of one layer's factors (leading stack axes allowed).

    ``qa [.., in', in']``, ``ea [.., in']``, ``qg [.., out, out]``, ``eg [.., out]`` with ``in'`` the
    input size plus one when the layer has a bias; ``s [.., in', out]`` is the EK-FAC diagonal in the
    Kronecker eigenbasis or ``None`` (plain K-FAC: ``s = ea eg ᵀ``).
    """

    qa: Array
    ea: Array
    qg: Array
    eg: Array
    s: Array | None = None


def symmetric_eigh(m: Array) -> tuple[Array, Array]:
    """``eigh`` of the symmetrised float32 matrix; eigenvalues clipped at 0 (a PSD factor's negative
    eigenvalues are round-off, and a negative one would make ``λ_A λ_G + λ`` vanish)."""
    m = m.astype(jnp.float32)
    m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
    e, q = jnp.linalg.eigh(m)
    return jnp.maximum(e, 0.0), q


def kron_eigh(a: Array, g: Array) -> KronEigen:
    """Eigendecompose a factor pair once (``jnp.linalg.eigh``, float32)."""
    ea, qa = symmetric_eigh(a)
    eg, qg = symmetric_eigh(g)
    return KronEigen(qa=qa, ea=ea, qg=qg, eg=eg)


def eigenvalues(eig: KronEigen) -> Array:
    """The curvature in the Kronecker eigenbasis: EK-FAC's ``S`` or K-FAC's ``λ_A λ_Gᵀ``."""
    if eig.s is not None:
        return eig.s
    return eig.ea[..., :, None] * eig.eg[..., None, :]


def to_eigenbasis(eig: KronEigen, v: Array) -> Array:
    """``Q_Aᵀ V Q_G`` for ``V [.., in', out]``."""
    return jnp.einsum("...ji,...jk,...kl->...il", eig.qa, v, eig.qg, precision="highest")


def from_eigenbasis(eig: KronEigen, v: Array) -> Array:
    """``Q_A V Q_Gᵀ``."""
    return jnp.einsum("...ij,...jk,...lk->...il", eig.qa, v, eig.qg, precision="highest")


def damped_inverse(eig: KronEigen, v: Array, damping: float | Array) -> Array:
    """``(A ⊗ G + λI)⁻¹ V`` (or EK-FAC's ``(S + λ)``) for ``V [.., in', out]``, float32."""
    v = v.astype(jnp.float32)
    return from_eigenbasis(eig, to_eigenbasis(eig, v) / (eigenvalues(eig) + damping))


def kron_matvec(a: Array, g: Array, v: Array, damping: float | Array = 0.0) -> Array:
    """``(A ⊗ G + λI) V = A V G + λ V`` (the explicit operator, for residual checks)."""
    return jnp.einsum("...ij,...jk,...kl->...il", a, v, g, precision="highest") + damping * v


def ekfac_diagonal(eig: KronEigen, a: Array, g: Array, mask: Array) -> Array:
    """Sum over tokens of ``(Q_Aᵀ a)² (Q_Gᵀ g)ᵀ²`` (per-token EK-FAC statistics).

    ``a [.., N, in']``, ``g [.., N, out]``, ``mask [N]``: each real token is one "example", the same
    convention as the K-FAC factors, so that with a single token EK-FAC equals K-FAC exactly.
    """
    ra = jnp.einsum("...ni,...ij->...nj", a, eig.qa, precision="highest")
    rg = jnp.einsum("...ni,...ij->...nj", g, eig.qg, precision="highest")
    return jnp.einsum("...ni,...nj,n->...ij", ra * ra, rg * rg, mask, precision="highest")
