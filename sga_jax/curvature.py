"""K-FAC curvature estimation: the Kronecker factors (and EK-FAC diagonal) of a model on a data set.

For every dense layer (``sga_jax.models.layers.Linear``, kernel ``[in, out]``) K-FAC (Martens &
Grosse 2015, arXiv 1503.05671, eq. 1) approximates the layer's block of the Fisher / Gauss-Newton
matrix by ``A ⊗ G`` with::

    A = (1/M) Σ_t m_t a_t a_tᵀ          a_t: layer input at token t (a 1 appended with a bias)
    G = (1/M) Σ_t m_t g_t g_tᵀ          g_t: gradient of the *summed* token loss w.r.t. the layer
                                             output at t, labels y ~ p_θ(·|x) (true Fisher = GGN
                                             of softmax cross-entropy), or the data labels
                                             (empirical Fisher), or all labels weighted by p (exact)
    M = Σ_t m_t                          m = ``attention_mask``: every real token is one "example"

Why two masks: the loss (which outputs the Fisher is about) covers the *target* tokens
(``loss_mask``: the answer tokens predicted by the model, shifted by one), while the pooling over
layer positions uses ``attention_mask``: prompt tokens feed the answer predictions through
attention, so their inputs and output gradients belong in A and G, and only padding is dropped
(its inputs are junk embeddings; its output gradients are zero because padded keys are masked).
With one example and one target, ``A ⊗ G`` equals the exact GGN block (tests/test_curvature.py).

Collection uses Flax NNX's own mechanisms: each tapped ``Linear`` sows its input
(``nnx.Intermediate("kfac_in")``) and adds a zero ``nnx.Perturbation("kfac_out")`` to its output;
the cotangent of the perturbation is ``g``. Under ``scan_layers=True`` both are stacked ``[L, ...]``
by ``nnx.scan`` and so are the factors. One jitted step per batch (shape) accumulates float32 sums.

Layers (as kfac-jax): this module only *estimates*; the algebra (eigenbases, damping,
preconditioning, the trust-region step) is :mod:`sga_jax.kfac_math`, the optax transform
:mod:`sga_jax.transforms.kfade` receives the curvature, and K-FADE's driver is
:mod:`sga_jax.kfade_driver`. Because A and G are each divided by M, the number of *attended*
(non-padding) tokens — prompt tokens included, not only the answer tokens the loss scores — K-FADE's
``½ ΔθᵀFΔθ`` approximates the retain outputs' KL change summed over answer tokens and divided by
M: a budget of about δ per attended token.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sga_jax import kfac_math
from sga_jax.errors import ConfigError, DataError
from sga_jax.kfac_math import KronEigen
from sga_jax.models.layers import Linear
from sga_jax.models.lora import LoRALinear, has_lora

Array = jax.Array
FISHER_TYPES = ("sampled", "empirical", "exact")
_KFAC_IN = "kfac_in"
_KFAC_OUT = "kfac_out"


class Targets(NamedTuple):
    """What a forward gives the estimator.

    ``logits [..., V]`` with ``labels`` / ``weights`` of the same leading shape (the summed,
    weighted cross-entropy is the loss whose Fisher is taken; the first axis holds independent
    examples), and ``pool`` (the mask over layer positions ``[B, T]`` or ``[B]``: which layer
    inputs / output gradients are pooled into A and G).
    """

    logits: Array
    labels: Array
    weights: Array
    pool: Array


class Factors(NamedTuple):
    """K-FAC factors per layer key (``"layers/0/self_attn/q_proj"``; scanned: ``"layers/self_attn/
    q_proj"`` with stacked ``[L, n, n]`` factors), float32 means over ``num_tokens`` tokens."""

    a: dict[str, Array]
    g: dict[str, Array]
    num_tokens: Array


def lm_forward(model: nnx.Module, batch: Mapping[str, Array]) -> Targets:
    """Causal-LM targets (docs/interfaces.md batch): token t+1 is predicted at t; the loss covers
    ``loss_mask`` (answer tokens; all real tokens when absent), pooling covers ``attention_mask``."""
    if "input_ids" not in batch:
        raise DataError(f"a batch needs input_ids (and attention_mask, loss_mask); got {sorted(batch)}")
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    attn = jnp.asarray(batch.get("attention_mask", jnp.ones_like(ids)), jnp.int32)
    logits = model(ids, attn)
    tmask = batch.get("loss_mask")
    tmask = attn if tmask is None else jnp.asarray(tmask, jnp.int32) * attn
    weights = (tmask[:, 1:] * attn[:, :-1]).astype(jnp.float32)
    return Targets(logits[:, :-1], ids[:, 1:], weights, attn.astype(jnp.float32))


# ------------------------------------------------------------------------------- layer selection


def _path_str(path: Iterable[Any]) -> str:
    return "/".join(str(p) for p in path)


def dense_layers(
    model: nnx.Module,
    *,
    include_lm_head: bool = False,
    layer_filter: str | Callable[[str], bool] | None = None,
) -> dict[str, Linear]:
    """The model's ``Linear`` modules by key (``"layers/3/mlp/down_proj"``), embeddings excluded.

    ``layer_filter``: a regex searched in the key, or a predicate on it. A model with LoRA adapters
    (:mod:`sga_jax.models.lora`) yields only its adapters' ``lora_a`` / ``lora_b`` matmuls
    (``"layers/3/mlp/down_proj/lora/lora_a"``): the base weights are frozen, so their curvature is
    not needed.
    """
    adapters_only = has_lora(model)
    if isinstance(layer_filter, str):
        pattern = re.compile(layer_filter)
        keep: Callable[[str], bool] = lambda k: pattern.search(k) is not None  # noqa: E731
    else:
        keep = layer_filter or (lambda k: True)
    out = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Linear) or (adapters_only and not isinstance(node, LoRALinear)):
            continue
        key = _path_str(path)
        if "lm_head" in key and not include_lm_head:
            continue
        if keep(key):
            out[key] = node
    if not out:
        raise ConfigError(f"no dense layer of {type(model).__name__} matches layer_filter={layer_filter!r}")
    return out


@contextlib.contextmanager
def taps(layers: Mapping[str, Linear]) -> Iterator[None]:
    """Switch the K-FAC hooks of ``layers`` on for the duration (restored afterwards)."""
    old = {k: m.kfac_tap for k, m in layers.items()}
    for m in layers.values():
        m.kfac_tap = True
    try:
        yield
    finally:
        for k, m in layers.items():
            m.kfac_tap = old[k]


# ------------------------------------------------------------------------------ the jitted step


def _pooled(x: Array, pool: Array) -> tuple[Array, Array]:
    """``x [*stack, *pool.shape, d]`` -> ``[*stack, N, d]`` float32 and the mask ``[N]``."""
    n_tok = pool.ndim
    stack = x.shape[: x.ndim - n_tok - 1]
    if x.shape[len(stack) : -1] != pool.shape:
        raise DataError(f"layer activations {x.shape} do not match the pooling mask {pool.shape}")
    return x.reshape(*stack, -1, x.shape[-1]).astype(jnp.float32), pool.reshape(-1)


def _outer_sum(x: Array, mask: Array) -> Array:
    return jnp.einsum("...ni,...nj,n->...ij", x, x, mask, precision="highest")


def _flat(state: nnx.State, leaf_name: str) -> dict[str, Any]:
    out = {}
    for path, var in nnx.to_flat_state(state):
        if path and path[-1] == leaf_name:
            out[_path_str(path[:-1])] = var.get_value()
    return out


def _sampled_stats(
    t: Targets, fisher: str, num_samples: int, key: Array, g_stats: Callable[[Array], dict[str, Array]]
) -> dict[str, Array]:
    """Mean over label draws of the pulled-back statistics. The cotangent of the summed loss is
    ``∂ℓ/∂z = w (p − e_y)``: ``y`` the data label (empirical) or ``y ~ p`` (sampled, true Fisher).
    Samples run in a ``lax.scan`` with a running sum, so memory does not grow with their number."""
    logits = jax.lax.stop_gradient(t.logits).astype(jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)
    w = t.weights.astype(jnp.float32)[..., None]

    def cotangent(y: Array) -> Array:
        return w * (p - jax.nn.one_hot(y, p.shape[-1], dtype=p.dtype))

    if fisher == "empirical":
        return g_stats(cotangent(t.labels))
    if num_samples == 1:
        return g_stats(cotangent(jax.random.categorical(jax.random.fold_in(key, 0), logits, axis=-1)))

    def body(carry, i):
        y = jax.random.categorical(jax.random.fold_in(key, i), logits, axis=-1)
        return jax.tree.map(jnp.add, carry, g_stats(cotangent(y))), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(g_stats, p))
    total, _ = jax.lax.scan(body, zero, jnp.arange(num_samples))
    return jax.tree.map(lambda x: x / num_samples, total)


def _make_step(
    graphdef: Any,
    forward: Callable[[nnx.Module, Mapping[str, Array]], Targets],
    fisher: str,
    num_samples: int,
    has_bias: Mapping[str, bool],
    shardings: Mapping[str, Any] | None,
) -> Callable:
    """``step(acc, pert0, params, rest, batch, key, eigen) -> acc``: one batch's K-FAC sums (or,
    with ``eigen``, EK-FAC diagonal sums) added to ``acc``."""

    def step(acc, pert0, params, rest, batch, key, eigen):
        def fwd(pert, params):
            m = nnx.merge(graphdef, params, rest)
            t, inputs = nnx.capture(forward, nnx.Intermediate, init=pert)(m, batch)
            return t.logits, (t, _flat(inputs, _KFAC_IN))

        # Differentiate w.r.t. the params too (their cotangents are unused and dropped by XLA's
        # dead-code elimination) so every variable nnx.scan sees lives at the same trace level.
        _, pullback, (t, inputs) = jax.vjp(fwd, pert0, params, has_aux=True)
        mask = t.pool.reshape(-1).astype(jnp.float32)
        a_pooled = {}
        for k, xs in inputs.items():
            if len(xs) != 1:
                raise ConfigError(
                    f"dense layer {k} is called {len(xs)} times per forward; K-FAC taps need one"
                )
            a, _ = _pooled(xs[0], t.pool)
            if has_bias[k]:
                a = jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), a.dtype)], axis=-1)
            a_pooled[k] = a

        def g_stats(ct: Array) -> dict[str, Array]:
            grads = _flat(pullback(ct.astype(t.logits.dtype))[0], _KFAC_OUT)
            out = {}
            for k, gk in grads.items():
                g, _ = _pooled(gk, t.pool)
                if eigen is None:
                    out[k] = _outer_sum(g, mask)
                else:
                    out[k] = kfac_math.ekfac_diagonal(eigen[k], a_pooled[k], g, mask)
            return out

        if fisher == "exact":
            g_sum = _exact_stats(t, g_stats)
        else:
            g_sum = _sampled_stats(t, fisher, num_samples, key, g_stats)
        out = {"count": acc["count"] + jnp.sum(mask)}
        out["g"] = {k: acc["g"][k] + g_sum[k] for k in acc["g"]}
        if eigen is None:
            out["a"] = {k: acc["a"][k] + _outer_sum(a_pooled[k], mask) for k in acc["a"]}
        if shardings:
            out = _constrain(out, shardings)
        return out

    return step


def _exact_stats(t: Targets, g_stats: Callable[[Array], dict[str, Array]]) -> dict[str, Array]:
    """Exact expectation over labels: ``Σ_{n,c} g(b_{n,c}) g(b_{n,c})ᵀ`` with the cotangent
    ``b_{n,c} = √p_c (e_c − p)`` at target position ``n`` only (the columns of a square root of
    softmax's Hessian ``diag(p) − ppᵀ``). Costs (targets per row × vocabulary) backward passes: for
    tests and tiny vocabularies."""
    logits = jax.lax.stop_gradient(t.logits).astype(jnp.float32)
    b = logits.shape[0]
    v = logits.shape[-1]
    lead = logits.shape[1:-1]
    n_pos = int(np.prod(lead)) if lead else 1
    p = jax.nn.softmax(logits, axis=-1).reshape(b, n_pos, v)
    w = t.weights.reshape(b, n_pos)
    eye = jnp.eye(v, dtype=jnp.float32)

    def at_position(carry, n):
        def for_class(c):
            onehot_n = (jnp.arange(n_pos) == n).astype(jnp.float32)[None, :, None]
            ct = onehot_n * w[:, :, None] * jnp.sqrt(p[:, :, c])[..., None] * (eye[c][None, None, :] - p)
            return g_stats(ct.reshape(logits.shape))

        per_class = jax.vmap(for_class)(jnp.arange(v))
        return jax.tree.map(lambda acc, x: acc + jnp.sum(x, axis=0), carry, per_class), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(g_stats, logits))
    total, _ = jax.lax.scan(at_position, zero, jnp.arange(n_pos))
    return total


def _constrain(tree: Any, shardings: Mapping[str, Any]) -> Any:
    for kind in ("a", "g"):
        if kind in tree:
            tree[kind] = {
                k: jax.lax.with_sharding_constraint(x, shardings[kind][k]) if k in shardings[kind] else x
                for k, x in tree[kind].items()
            }
    return tree


def _row_sharding(shape: tuple[int, ...], mesh: jax.sharding.Mesh, row_axes: Any) -> Any:
    """Rows of a ``[.., n, n]`` factor split over ``row_axes`` (dropped when they do not divide)."""
    names = row_axes if isinstance(row_axes, tuple) else (row_axes,)
    size = int(np.prod([mesh.shape[n] for n in names]))
    rows = row_axes if size > 1 and shape[-2] % size == 0 else None
    return NamedSharding(mesh, P(*([None] * (len(shape) - 2)), rows, None))


@functools.lru_cache(maxsize=32)
def _jitted_step(graphdef, forward, fisher, num_samples, has_bias, shardings) -> Callable:
    """One jitted step per (model structure, forward, options); jit caches the batch shapes."""
    shardings = None if shardings is None else {kind: dict(items) for kind, items in shardings}
    step = _make_step(graphdef, forward, fisher, num_samples, dict(has_bias), shardings)
    return jax.jit(step, donate_argnums=(0,))


class _Collector:
    """Runs the jitted accumulation over batches; one compile per batch shape."""

    def __init__(
        self,
        model: nnx.Module,
        layers: Mapping[str, Linear],
        forward: Callable[[nnx.Module, Mapping[str, Array]], Targets],
        fisher: str,
        num_samples: int,
        mesh: jax.sharding.Mesh | None,
        row_axes: Any,
    ):
        if fisher not in FISHER_TYPES:
            raise ConfigError(f"unknown fisher {fisher!r}; use one of {', '.join(FISHER_TYPES)}")
        if int(num_samples) < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        self.model, self.layers, self.forward = model, dict(layers), forward
        self.fisher, self.num_samples = fisher, int(num_samples)
        self.mesh, self.row_axes = mesh, row_axes
        self._compiled: dict[Any, tuple] = {}

    def _prepare(self, batch: Mapping[str, Array]):
        sig = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if sig in self._compiled:
            return self._compiled[sig]
        # The tap flags are static attributes: they live in the graphdef, the model is restored.
        with taps(self.layers):
            graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)

        def init(params, rest):
            # One abstract forward gives the perturbations' shapes ([L, B, T, out] under scan).
            m = nnx.merge(graphdef, params, rest)
            t, pert, inputs = nnx.capture(self.forward, nnx.Perturbation, nnx.Intermediate)(m, batch)
            return pert, inputs, t.pool

        pert_shapes, inputs_shapes, pool = jax.eval_shape(init, params, rest)
        in_shapes = _flat(inputs_shapes, _KFAC_IN)
        out_shapes = _flat(pert_shapes, _KFAC_OUT)
        has_bias = {k: m.bias is not None for k, m in self.layers.items()}
        a_shapes, g_shapes = {}, {}
        for k, m in self.layers.items():
            if k not in in_shapes or k not in out_shapes:
                raise ConfigError(f"dense layer {k} was not called by the forward")
            x = in_shapes[k][0].shape
            stack = x[: len(x) - pool.ndim - 1]
            n_in = m.kernel.get_value().shape[-2] + int(has_bias[k])
            n_out = out_shapes[k].shape[-1]
            a_shapes[k] = (*stack, n_in, n_in)
            g_shapes[k] = (*stack, n_out, n_out)
        shardings = None
        if self.mesh is not None:
            shardings = {
                "a": {k: _row_sharding(s, self.mesh, self.row_axes) for k, s in a_shapes.items()},
                "g": {k: _row_sharding(s, self.mesh, self.row_axes) for k, s in g_shapes.items()},
            }
        jitted = _jitted_step(
            graphdef,
            self.forward,
            self.fisher,
            self.num_samples,
            tuple(sorted(has_bias.items())),
            None
            if shardings is None
            else tuple((kind, tuple(sorted(d.items()))) for kind, d in shardings.items()),
        )
        pert0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pert_shapes)
        entry = (jitted, pert0, params, rest, a_shapes, g_shapes, shardings)
        self._compiled[sig] = entry
        return entry

    def run(
        self, batches: Iterable[Mapping[str, Array]], key: Array, eigen: Mapping[str, KronEigen] | None = None
    ) -> dict[str, Any]:
        acc = None
        for i, batch in enumerate(batches):
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            jitted, pert0, params, rest, a_shapes, g_shapes, shardings = self._prepare(batch)
            if acc is None:
                acc = _zeros(a_shapes, g_shapes, eigen, shardings)
            acc = jitted(acc, pert0, params, rest, batch, jax.random.fold_in(key, i), eigen)
        if acc is None:
            raise DataError("no retain batches were given to estimate the curvature from")
        return acc


def _zeros(a_shapes, g_shapes, eigen, shardings) -> dict[str, Any]:
    def z(shape, sh):
        x = jnp.zeros(shape, jnp.float32)
        return jax.device_put(x, sh) if sh is not None else x

    acc: dict[str, Any] = {"count": jnp.zeros((), jnp.float32)}
    if eigen is None:
        acc["a"] = {k: z(s, shardings and shardings["a"][k]) for k, s in a_shapes.items()}
        acc["g"] = {k: z(s, shardings and shardings["g"][k]) for k, s in g_shapes.items()}
    else:
        acc["g"] = {k: jnp.zeros((*a_shapes[k][:-1], g_shapes[k][-1]), jnp.float32) for k in a_shapes}
    return acc


# ------------------------------------------------------------------------------------ public API


def estimate_factors(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Array]],
    *,
    fisher: str = "sampled",
    num_samples: int = 1,
    key: Array | int = 0,
    include_lm_head: bool = False,
    layer_filter: str | Callable[[str], bool] | None = None,
    forward: Callable[[nnx.Module, Mapping[str, Array]], Targets] = lm_forward,
    mesh: jax.sharding.Mesh | None = None,
    row_axes: Any = "fsdp",
) -> Factors:
    """K-FAC factors ``A``, ``G`` of ``model``'s dense layers over ``batches`` (retain set).

    ``fisher``: ``"sampled"`` (labels from the model, the true Fisher; default), ``"empirical"``
    (data labels) or ``"exact"`` (expectation over every label; cost × vocabulary × targets, for
    tests). ``batches``: dicts as in docs/interfaces.md. With a ``mesh`` the factors are sharded
    along their rows over ``row_axes``. The model is not modified.
    """
    key = jax.random.key(key) if isinstance(key, int) else key
    layers = dense_layers(model, include_lm_head=include_lm_head, layer_filter=layer_filter)
    acc = _Collector(model, layers, forward, fisher, num_samples, mesh, row_axes).run(batches, key)
    count = acc["count"]
    if float(count) <= 0:
        raise DataError("the retain batches hold no real tokens (attention_mask is all zero)")
    return Factors(
        a={k: v / count for k, v in acc["a"].items()},
        g={k: v / count for k, v in acc["g"].items()},
        num_tokens=count,
    )


def eigendecompose(factors: Factors) -> dict[str, KronEigen]:
    """``eigh`` of every factor pair once (float32)."""
    eig = jax.jit(kfac_math.kron_eigh)
    return {k: eig(factors.a[k], factors.g[k]) for k in factors.a}


def estimate_ekfac(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Array]],
    eigen: Mapping[str, KronEigen],
    *,
    fisher: str = "sampled",
    num_samples: int = 1,
    key: Array | int = 1,
    forward: Callable[[nnx.Module, Mapping[str, Array]], Targets] = lm_forward,
) -> dict[str, KronEigen]:
    """EK-FAC (George et al. 2018, arXiv 1806.03884): re-estimate the diagonal in the Kronecker
    eigenbasis, ``S = (1/M) Σ_t (Q_Aᵀ a_t)² (Q_Gᵀ g_t)ᵀ²``, from a second pass over the batches.
    Returns ``eigen`` with ``s`` filled in.

    The diagonal is accumulated per *token* (each attended token's rank-one term, M = attended
    tokens). kronfluence (github.com/pomonam/kronfluence, its EK-FAC "lambda" matrices) squares
    the per-*sequence* gradient ``Σ_t (Q_Aᵀ a_t)(Q_Gᵀ g_t)ᵀ`` instead, which keeps the cross-token
    terms; the two agree for one token per sequence and differ otherwise."""
    key = jax.random.key(key) if isinstance(key, int) else key
    eigen = {k: e._replace(s=None) for k, e in eigen.items()}
    layers = {k: m for k, m in dense_layers(model, include_lm_head=True).items() if k in eigen}
    if set(layers) != set(eigen):
        raise ConfigError(f"eigenbases for layers the model lacks: {sorted(set(eigen) - set(layers))}")
    acc = _Collector(model, layers, forward, fisher, num_samples, None, None).run(batches, key, eigen)
    count = acc["count"]
    return {k: eigen[k]._replace(s=acc["g"][k] / count) for k in eigen}


def estimate_curvature(
    model: nnx.Module,
    retain_batches: Iterable[Mapping[str, Array]],
    *,
    ekfac: bool = False,
    **kwargs: Any,
) -> dict[str, KronEigen]:
    """Factors -> eigenbases (-> EK-FAC diagonal): what ``kfade`` needs. ``retain_batches`` must be
    re-iterable (a list) when ``ekfac`` is set. ``kwargs`` go to :func:`estimate_factors`."""
    batches = list(retain_batches)
    eigen = eigendecompose(estimate_factors(model, batches, **kwargs))
    if ekfac:
        keep = {k: kwargs[k] for k in ("fisher", "num_samples", "forward") if k in kwargs}
        eigen = estimate_ekfac(model, batches, eigen, **keep)
    return eigen


__all__ = [
    "FISHER_TYPES",
    "Factors",
    "KronEigen",
    "Targets",
    "dense_layers",
    "eigendecompose",
    "estimate_curvature",
    "estimate_ekfac",
    "estimate_factors",
    "lm_forward",
    "taps",
]
