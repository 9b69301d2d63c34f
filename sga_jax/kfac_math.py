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

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sga_jax.errors import ConfigError

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


DAMPING_MODES = ("relative", "absolute")  # λ as a multiple of each block's mean eigenvalue, or as is


def block_damping(eigen: Mapping[str, KronEigen], factor: float) -> dict[str, Array]:
    """Damping relative to each block's spectrum: ``λ_k = factor · mean(λ_A λ_Gᵀ)`` (EK-FAC: ``mean(S)``)
    per layer key (per stacked layer for scanned factors, shape ``[.., 1, 1]``), floored at 1e-12.

    An absolute λ means nothing across blocks whose eigenvalues differ by orders of magnitude (on
    SmolLM2-135M the median K-FAC products are 8e-9 … 6e-7 per layer type, and a λ of 1e-3 sits
    above 99 % of the spectrum: the step becomes a scaled gradient); kronfluence's heuristic damping
    is 0.1 × the mean eigenvalue (github.com/pomonam/kronfluence, ``FactorArguments`` /
    ``lambda_heuristic``)."""
    out = {}
    for k, e in eigen.items():
        mean = jnp.mean(eigenvalues(e), axis=(-2, -1), keepdims=True)
        out[k] = jnp.maximum(factor * mean, 1e-12).astype(jnp.float32)
    return out


# ------------------------------------------------------------------------------ preconditioning

UNTAPPED = ("freeze", "identity")  # what preconditioning does to parameters without curvature


def _key_names(path: tuple) -> tuple[str, ...]:
    names = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            names.append(str(p.key))
        elif isinstance(p, jax.tree_util.GetAttrKey):
            names.append(p.name)
        elif isinstance(p, jax.tree_util.SequenceKey):
            names.append(str(p.idx))
        elif isinstance(p, jax.tree_util.FlattenedIndexKey):
            names.append(str(p.key))
        else:
            names.append(str(p))
    while names and names[-1] in ("value", "raw_value"):  # nnx.Variable leaves
        names.pop()
    return tuple(names)


def precondition(
    eigen: Mapping[str, KronEigen],
    grads: Any,
    damping: float | Array | Mapping[str, Array],
    *,
    untapped: str = "freeze",
) -> tuple[Any, Array]:
    """``(F + λI)⁻¹ g`` for a gradient pytree (an ``nnx.State`` of params or any tree whose paths
    end in ``<layer key>/kernel`` and ``<layer key>/bias``); returns ``(P g, gᵀ P g)``.

    ``damping``: one λ, or per layer key (:func:`block_damping`). Parameters without curvature
    (embeddings, norms, untapped layers) get 0 (``"freeze"``: they are not moved) or ``g / λ``
    (``"identity"``: zero curvature assumed; with per-block damping, λ is their mean).
    """
    if untapped not in UNTAPPED:
        raise ConfigError(f"unknown untapped={untapped!r}; use one of {', '.join(UNTAPPED)}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
    names = [_key_names(p) for p, _ in leaves]
    by_layer: dict[str, dict[str, int]] = {}
    for i, n in enumerate(names):
        if len(n) >= 2 and n[-1] in ("kernel", "bias") and "/".join(n[:-1]) in eigen:
            by_layer.setdefault("/".join(n[:-1]), {})[n[-1]] = i
    missing = sorted(set(eigen) - set(by_layer))
    if missing:
        raise ConfigError(f"the gradient has no kernel for the curvature layers {missing[:3]}...")
    out: list[Any] = [None] * len(leaves)
    quad = jnp.zeros((), jnp.float32)
    for k, idx in by_layer.items():
        kern = leaves[idx["kernel"]][1]
        v = kern.astype(jnp.float32)
        has_bias = "bias" in idx and eigen[k].qa.shape[-1] == kern.shape[-2] + 1
        if has_bias:
            v = jnp.concatenate([v, leaves[idx["bias"]][1].astype(jnp.float32)[..., None, :]], axis=-2)
        x = damped_inverse(eigen[k], v, damping[k] if isinstance(damping, Mapping) else damping)
        quad = quad + jnp.sum(x * v)
        out[idx["kernel"]] = x[..., : kern.shape[-2], :].astype(kern.dtype)
        if has_bias:
            bias = leaves[idx["bias"]][1]
            out[idx["bias"]] = x[..., -1, :].astype(bias.dtype)
    if isinstance(damping, Mapping):
        damping = jnp.mean(jnp.stack([jnp.mean(d) for d in damping.values()]))
    for i, (_, leaf) in enumerate(leaves):
        if out[i] is None:
            if untapped == "freeze":
                out[i] = jnp.zeros_like(leaf)
            else:
                out[i] = (leaf / damping).astype(leaf.dtype)
                quad = quad + jnp.sum(jnp.square(leaf.astype(jnp.float32))) / damping
    return jax.tree_util.tree_unflatten(treedef, out), quad


def trust_region_step_size(quad: Array, trust_region: float, max_step_size: float | None) -> Array:
    """``η = min(η_max, √(2δ / q))`` so that ``½ η² q = δ``, ``q = dᵀMd`` the quadratic of the
    direction ``d``: K-FAC's own ``gᵀPg = (Pg)ᵀ(F + λI)(Pg)``, or the exact Gauss-Newton ``dᵀGd``
    (:func:`sga_jax.output_space.gauss_newton_quadratic`)."""
    eta = jnp.sqrt(2.0 * trust_region / jnp.maximum(quad, jnp.finfo(jnp.float32).tiny))
    if max_step_size is not None:
        eta = jnp.minimum(eta, max_step_size)
    return eta
