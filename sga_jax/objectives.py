"""Unlearning objectives as pure functions (all *minimised*).

Inputs are per-sequence negative log-likelihoods (``[B]`` arrays from
:func:`sga_jax.logprobs.sequence_nll`): token-mean ``l̄ = -(1/|y|) Σ_t log p(y_t | ...)`` for every
objective except NPO, which takes the *summed* ``l = -Σ_t log p(y_t | ...) = -log π(y|x)`` as its
paper and open-unlearning do; FLAT takes per-token log-probs with their masks
(:func:`sga_jax.logprobs.token_logprobs`). Sign conventions follow docs/design.md; each function
cites its paper and the official code it matches.

Batch reduction: the mean over examples, or — when ``num_tokens`` (answer tokens per row) is given
to :func:`nll_loss`, :func:`ga_loss` or :func:`graddiff_loss` — the mean over all answer tokens of
the batch, ``Σ_b n_b·l̄_b / Σ_b n_b``, which is what open-unlearning's GA / GradDiff compute
(HF ``outputs.loss``: token-average cross-entropy over the batch).

Argument problems a user can cause (r > 1, K < 1, mismatched shapes, empty masks, an unknown
divergence) raise :class:`sga_jax.errors.ConfigError`. Checks on values run only where the value
is concrete (outside ``jit``); shape checks always run.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sga_jax.config import FLAT_DIVERGENCE_ALIASES, FLAT_DIVERGENCES, check_smoothing_rate
from sga_jax.errors import ConfigError

Array = jax.Array

# ------------------------------------------------------------------------------------- helpers


def _host(x) -> np.ndarray | None:
    """``x`` when it is host data (a numpy array or a Python / numpy scalar), else ``None``.

    Value checks (empty rows, the range of r) run on host inputs only: inputs validated before
    they reach a jitted step (the runner's data path, the config) are not re-checked on device
    arrays or tracers, and nothing here needs to tell a tracer apart.
    """
    if isinstance(x, np.ndarray | np.generic | int | float):
        return np.asarray(x)
    return None


def _check_r(r) -> None:
    value = _host(r)
    if value is not None and value.size == 1:
        check_smoothing_rate(float(value))


def _check_1d(name: str, x: Array) -> None:
    if jnp.ndim(x) != 1:
        raise ConfigError(f"{name} must be a [B] array of per-sequence NLLs, got shape {jnp.shape(x)}")


def _check_same(names: tuple[str, str], a: Array, b: Array) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ConfigError(f"{names[0]} {jnp.shape(a)} and {names[1]} {jnp.shape(b)} must have the same shape")


def _check_mask(name: str, logp: Array, mask: Array) -> None:
    if jnp.ndim(logp) != 2 or jnp.shape(logp) != jnp.shape(mask):
        raise ConfigError(
            f"{name}: log-probs {jnp.shape(logp)} and mask {jnp.shape(mask)} must both be [B, T]"
        )
    host = _host(mask)
    if host is not None:
        counts = host.astype(bool).sum(axis=-1)
        if (counts == 0).any():
            rows = np.flatnonzero(counts == 0).tolist()
            raise ConfigError(f"{name}: empty loss mask in rows {rows} (no answer token to score)")


def masked_mean(x: Array, mask: Array) -> Array:
    """Per-row mean of ``x [B, T]`` over ``mask`` (rows with an empty mask give 0)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def sequence_nll_from_logprobs(logp: Array, mask: Array) -> Array:
    """Token-mean NLL ``[B]`` from per-token log-probs ``[B, T]`` and their mask."""
    return -masked_mean(logp, mask)


# ----------------------------------------------------------------------------------- baselines


def reduce_nll(nll: Array, num_tokens: Array | None = None) -> Array:
    """The batch NLL from per-row token-mean NLLs ``[B]``: ``mean_b l̄_b`` (``num_tokens=None``,
    "sequence" reduction) or ``Σ_b n_b·l̄_b / Σ_b n_b`` over all answer tokens ("token" reduction,
    open-unlearning's / HF's ``outputs.loss``)."""
    _check_1d("nll", nll)
    if num_tokens is None:
        return jnp.mean(nll)
    _check_same(("nll", "num_tokens"), nll, num_tokens)
    n = jnp.asarray(num_tokens, jnp.float32)
    return jnp.sum(nll * n) / jnp.maximum(jnp.sum(n), 1.0)


def nll_loss(nll: Array, num_tokens: Array | None = None) -> Array:
    """Plain NLL (fine-tuning, retain terms): ``L = reduce_nll(l)`` (see :func:`reduce_nll`)."""
    return reduce_nll(nll, num_tokens)


def ga_loss(nll_forget: Array, num_tokens: Array | None = None) -> Array:
    """Gradient ascent on the forget set (Jang et al. 2023, arXiv 2210.01504): ``L = -reduce_nll(l_f)``.

    open-unlearning (``src/trainer/unlearn/grad_ascent.py`` l. 12-13: ``loss = -outputs.loss``)
    averages over all answer tokens of the batch: pass ``num_tokens`` for that."""
    return -reduce_nll(nll_forget, num_tokens)


def graddiff_loss(
    nll_forget: Array,
    nll_retain: Array,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    num_tokens_forget: Array | None = None,
    num_tokens_retain: Array | None = None,
) -> Array:
    """Gradient difference (Liu et al. 2022, arXiv 2203.12817; TOFU's GradDiff, arXiv 2401.06121):
    ``L = -γ·reduce_nll(l_f) + α·reduce_nll(l_r)`` with open-unlearning's ``gamma``, ``alpha``
    (``src/trainer/unlearn/grad_diff.py`` l. 49-60: token-averaged ``outputs.loss`` on both sets;
    pass ``num_tokens_*`` for that)."""
    _check_1d("nll_retain", nll_retain)
    return -gamma * reduce_nll(nll_forget, num_tokens_forget) + alpha * reduce_nll(
        nll_retain, num_tokens_retain
    )


def npo_loss(nll_forget: Array, nll_forget_ref: Array, *, beta: float = 0.1) -> Array:
    """Negative Preference Optimisation (Zhang et al. 2024, arXiv 2404.05868, eq. 3):
    ``L = -(2/β)·mean_b log σ(β·(l_f - l_f,ref))``.

    ``l_f`` must be the **summed** answer NLL ``-log π(y|x) = -Σ_t log p(y_t | ...)`` (not the
    token mean: a mean makes σ's argument |y| times smaller and NPO all but GA), as the paper's
    ``log π_θ(y|x)`` and open-unlearning's ``compute_dpo_loss`` (``src/trainer/utils.py`` l. 34-44
    ``compute_batch_nll`` sums over tokens; l. 61-66 the loss) have it. ``l_f,ref`` is the summed
    NLL of the same rows under the frozen reference (starting) model — a constant here: pass it
    precomputed or under ``stop_gradient``. Batch mean over rows, as open-unlearning's ``.mean()``."""
    _check_1d("nll_forget", nll_forget)
    _check_same(("nll_forget", "nll_forget_ref"), nll_forget, nll_forget_ref)
    if beta <= 0:
        raise ConfigError(f"NPO beta must be > 0, got {beta}")
    ratio = nll_forget - jax.lax.stop_gradient(nll_forget_ref)
    return -(2.0 / beta) * jnp.mean(jax.nn.log_sigmoid(beta * ratio))


def simnpo_loss(
    nll_forget: Array, *, beta: float = 4.5, gamma: float = 0.0, forget_weight: float = 0.125
) -> Array:
    """SimNPO (Fan et al. 2024, arXiv 2410.07163): reference-free, length-normalised NPO,
    ``L = w·(-(2/β)·mean_b log σ(β·(l̄_f - γ)))`` on the token-mean NLL ``l̄_f``.

    Names and defaults as open-unlearning's TOFU config (``configs/trainer/SimNPO.yaml`` l. 5-9)
    and its loss (``src/trainer/unlearn/simnpo.py`` l. 18-20, 30):

    * ``beta`` = β (its ``beta``, 4.5);
    * ``gamma`` = γ, the reward margin, in NLL units inside β(·) (its ``delta``, 0.0; the SimNPO
      authors' code calls it ``gamma``). The paper writes the margin outside β, ``σ(β·l̄ - γ')``,
      i.e. ``γ' = β·γ``; equal at the default 0;
    * ``forget_weight`` = w, the weight of this forget term (its ``gamma``, 0.125; the authors'
      ``npo_coeff``). The retain weight (its ``alpha``, 1.0) is the runner's ``retain_weight``.
    """
    _check_1d("nll_forget", nll_forget)
    if beta <= 0:
        raise ConfigError(f"SimNPO beta must be > 0, got {beta}")
    return -forget_weight * (2.0 / beta) * jnp.mean(jax.nn.log_sigmoid(beta * (nll_forget - gamma)))


# -------------------------------------------------------------------------------------------- SGA


def sga_direction_weights(r, K: int) -> tuple:
    """Coefficients ``(c_f, c_n)`` of the SGA loss ``L = -c_f·l_f - c_n·Σ_i l_i``.

    ``c_f = 1 - r(K-1)/K`` and ``c_n = r/K`` (arXiv 2510.22376, its SGA loss): generalised label smoothing
    of the forget sample's "label" over 1 forget + K-1 normal samples. r = -0.8, K = 4 gives
    (1.6, -0.2): the forget sample is ascended with weight 1.6 and each normal sample descended with
    weight 0.2.
    """
    if int(K) != K or K < 1:
        raise ConfigError(f"SGA K (1 forget + K-1 normal samples) must be an integer >= 1, got {K}")
    _check_r(r)
    return 1.0 - r * (K - 1) / K, r / K


def sga_loss(nll_forget: Array, nll_normal: Array, r) -> Array:
    """Smoothed Gradient Ascent ("Label Smoothing Improves Gradient Ascent in LLM Unlearning",
    arXiv 2510.22376; no official code is public).

    ``L = mean_b[-(1 - r(K-1)/K)·l_f - (r/K)·Σ_{i<K} l_i]`` with ``K = nll_normal.shape[1] + 1``
    and smoothing rate ``r <= 1``. r = 0 is exactly gradient ascent; r < 0 ascends the forget
    sample harder and descends the normal samples. Its gradient is ``-g_f - r·u`` with
    ``u = ḡ_n - (1 - 1/K)·g_f``, ``ḡ_n = (1/K)·Σ_i g_i`` (see :func:`sga_jax.transforms.sga`).
    Each l is a per-row token-mean NLL and the batch reduction is the mean over forget rows: the
    paper does not state its reduction (unknown), so this is our choice.

    Args:
      nll_forget: ``[B]`` token-mean NLL of each forget example.
      nll_normal: ``[B, K-1]`` token-mean NLL of its K-1 normal samples (``[B, 0]`` for K = 1).
      r: smoothing rate (float or a traced scalar, e.g. from a schedule).
    """
    _check_1d("nll_forget", nll_forget)
    if jnp.ndim(nll_normal) != 2 or jnp.shape(nll_normal)[0] != jnp.shape(nll_forget)[0]:
        raise ConfigError(
            f"nll_normal must be [B, K-1] with B = {jnp.shape(nll_forget)[0]} (nll_forget's batch), "
            f"got shape {jnp.shape(nll_normal)}"
        )
    k = jnp.shape(nll_normal)[1] + 1
    c_f, c_n = sga_direction_weights(r, k)
    return jnp.mean(-c_f * nll_forget - c_n * jnp.sum(nll_normal, axis=1))


# ------------------------------------------------------------------------------------------- FLAT

# The variational representation of f-divergences, D_f(P‖Q) >= sup_V E_P[g(V)] - E_Q[f*(g(V))]
# (Nguyen et al. 2010; f-GAN, Nowozin et al. 2016, arXiv 1606.00709, Table 2), which FLAT
# (arXiv 2410.11143) applies with V = the mean token probability. Each entry is
# (activation g, conjugate composed with it f*∘g); both are increasing in v, so minimising
# -g(P_e) + f*(g(P_f)) raises P_e and lowers P_f for every divergence.
# FLAT's official code (UCSC-REAL/FLAT, dataloader.py l. 806-860, get_contrastive_loss) computes
# activation(P_e) - conjugate(P_f) with its own table. KL, Pearson, JS and Total Variation (its
# default, l. 806 and config/forget.yaml l. 22) agree with ours. Elsewhere it differs: its
# reverse-KL and squared-Hellinger activations use e^{+v} where f-GAN has e^{-v}, so they lower P_e
# and raise P_f (the objective reversed); its Neyman pairs that flipped activation with the bare
# conjugate f*(v) = 2 - 2·sqrt(1 - v) (not f*∘g), so it lowers *both* P_e and P_f; its Jeffrey
# replaces the Lambert-W conjugate by a cubic Taylor series. We keep f-GAN's table.
_LOG2 = float(np.log(2.0))


def _lambertw_principal(x: Array) -> Array:
    """Principal branch of Lambert W on x >= 1/e (here x = e^{1-t} in [1, e]): Newton on w·e^w = x."""
    w = jnp.log1p(x)  # within 0.2 of the root on [1, e]; Newton converges quadratically
    for _ in range(8):
        ew = jnp.exp(w)
        w = w - (w * ew - x) / (ew * (w + 1.0))
    return w


def _jeffrey_conjugate(t: Array) -> Array:
    w = _lambertw_principal(jnp.exp(1.0 - t))
    return w + 1.0 / w + t - 2.0


# One (g, f*∘g) pair per name of sga_jax.config.FLAT_DIVERGENCES (the one list of names).
_FLAT_PAIRS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "kl": (lambda v: v, lambda v: jnp.exp(v - 1.0)),
    "reverse_kl": (lambda v: -jnp.exp(-v), lambda v: -1.0 + v),
    "pearson": (lambda v: v, lambda v: v * v / 4.0 + v),
    "neyman": (lambda v: 1.0 - jnp.exp(-v), lambda v: 2.0 - 2.0 * jnp.exp(-v / 2.0)),
    "hellinger": (lambda v: 1.0 - jnp.exp(-v), lambda v: jnp.exp(v) - 1.0),  # squared Hellinger
    "jeffrey": (lambda v: v, _jeffrey_conjugate),
    "js": (lambda v: _LOG2 - jax.nn.softplus(-v), lambda v: jax.nn.softplus(v) - _LOG2),
    "tv": (lambda v: 0.5 * jnp.tanh(v), lambda v: 0.5 * jnp.tanh(v)),  # total variation
}
assert set(_FLAT_PAIRS) == set(FLAT_DIVERGENCES), "objectives and config name the same f-divergences"


def flat_divergence(name: str) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """``(g, f*∘g)`` of a FLAT f-divergence by name (case-insensitive; the aliases of
    ``sga_jax.config.FLAT_DIVERGENCE_ALIASES`` accepted)."""
    key = FLAT_DIVERGENCE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _FLAT_PAIRS:
        names = ", ".join(sorted(FLAT_DIVERGENCES))
        raise ConfigError(f"unknown f-divergence {name!r}; choose one of {names}")
    return _FLAT_PAIRS[key]


def mean_token_prob(logp: Array, mask: Array) -> Array:
    """``P = (1/|y|)·Σ_t p(y_t | ...)`` per row: FLAT's mean token probability (arXiv 2410.11143)."""
    return masked_mean(jnp.exp(logp.astype(jnp.float32)), mask)


def flat_loss(
    logp_forget: Array,
    mask_forget: Array,
    logp_template: Array,
    mask_template: Array,
    *,
    divergence: str = "total_variation",
) -> Array:
    """FLAT (Wang et al. 2025, "LLM Unlearning via Loss Adjustment with Only Forget Data",
    arXiv 2410.11143): ``L = mean_b[-g(P_e) + f*(g(P_f))]``.

    ``P_f`` and ``P_e`` are the mean token probabilities (:func:`mean_token_prob`) of the forget
    answer and of the template answer ("I don't know") for the same question; minimising L raises
    the template's probability (through the activation g) and lowers the forget answer's (through
    the conjugate f*∘g), i.e. maximises the variational estimate of D_f between the two.

    Args:
      logp_forget, mask_forget: ``[B, T]`` per-token log-probs of the forget answers and their mask.
      logp_template, mask_template: ``[B, T']`` the same for the template answers.
      divergence: one of ``kl, js, pearson, total_variation, reverse_kl, jeffrey,
        squared_hellinger, neyman``; default total variation, as the official code
        (``get_contrastive_loss(..., div='Total-Variation')``, config/forget.yaml ``variants``).

    Unlike FLAT's reference code, which averages P over the batch *and* the padding positions
    before applying g, each example's P is the mean over its own answer tokens and the loss is
    averaged over examples, as the paper's per-sample objective reads. The (g, f*∘g) pairs are
    f-GAN's Table 2 (see ``_FLAT_PAIRS``).
    """
    g, conj = flat_divergence(divergence)
    _check_mask("logp_forget", logp_forget, mask_forget)
    _check_mask("logp_template", logp_template, mask_template)
    if jnp.shape(logp_forget)[0] != jnp.shape(logp_template)[0]:
        raise ConfigError(
            f"forget ({jnp.shape(logp_forget)[0]}) and template ({jnp.shape(logp_template)[0]}) "
            "batches must have the same number of rows"
        )
    p_f = mean_token_prob(logp_forget, mask_forget)
    p_e = mean_token_prob(logp_template, mask_template)
    return jnp.mean(-g(p_e) + conj(p_f))


# ---------------------------------------------------------------- methods with a frozen reference


def rmu_activation_loss(act: Array, target: Array, mask: Array) -> Array:
    """RMU's activation MSE (open-unlearning src/trainer/unlearn/rmu.py l. 108-117,
    ``compute_activation_loss``) over ``act [B, T, d]`` and ``target`` (broadcast to it: the
    steering vector ``[d]`` on the forget set, the frozen model's activations on the retain set),
    ``mask [B, T]`` the answer tokens (its ``labels != -100``). With ``s_b = Σ_t m_bt·mean_d
    (a_btd - c_btd)²`` and ``n_b = Σ_t m_bt``, its ``(s / n).mean()`` divides ``s [B]`` by
    ``n [B, 1]``, a ``[B, B]`` broadcast: the loss is ``mean_b s_b · mean_b (1 / n_b)`` (the
    per-row mean ``mean_b s_b / n_b`` when rows have equal answer lengths), computed here as the
    code computes it. In float32."""
    a = act.astype(jnp.float32)
    c = jnp.broadcast_to(jnp.asarray(target, jnp.float32), a.shape)
    m = mask.astype(jnp.float32)
    per_token = jnp.mean(jnp.square(a - c), axis=-1)
    s = jnp.sum(per_token * m, axis=-1)
    return jnp.mean(s) * jnp.mean(1.0 / jnp.maximum(jnp.sum(m, axis=-1), 1.0))


def rmu_control_vector(dim: int, coeff: float, seed: int) -> Array:
    """RMU's steering target ``coeff · u / ‖u‖`` with ``u ~ U[0, 1)^d`` drawn once (rmu.py
    l. 100-106, ``torch.rand(1, 1, dim)``); here from ``jax.random.key(seed)``."""
    u = jax.random.uniform(jax.random.key(seed), (dim,), jnp.float32)
    return coeff * u / jnp.linalg.norm(u)


def undial_loss(logits: Array, ref_logits: Array, targets: Array, mask: Array, *, beta: float) -> Array:
    """UNDIAL (Dong et al. 2024, arXiv 2402.10052; open-unlearning src/trainer/utils.py l. 70-99,
    ``compute_undial_loss``): the cross-entropy ``-Σ_v q_v log p_v`` of the model's next-token
    distribution p against ``q = softmax(z_ref - β·onehot(y))``, the frozen model's logits with the
    target token's lowered by β. ``logits`` / ``ref_logits [B, T, V]`` predict ``targets [B, T]``
    (already shifted), ``mask [B, T]`` marks the answer tokens; the mean over them. (open-unlearning
    averages over every position, prompt and padding included, where the -100 label wraps to token
    V-100: here only answer tokens count.)"""
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    q = jax.nn.softmax(jax.lax.stop_gradient(ref_logits.astype(jnp.float32)) - beta * onehot, axis=-1)
    ce = -jnp.sum(q * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def dpo_loss(
    nll_chosen: Array,
    nll_rejected: Array,
    nll_chosen_ref: Array,
    nll_rejected_ref: Array,
    *,
    beta: float = 0.1,
) -> Array:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290) as open-unlearning's ``compute_dpo_loss``
    (src/trainer/utils.py l. 47-67): with summed answer NLLs l and log-ratios
    ``ρ = -(l - l_ref)``, ``L = -(2/β)·mean_b log σ(β(ρ_chosen - ρ_rejected))``. IdkDPO: an IdK
    answer is chosen, the forget answer rejected (its dpo.py l. 13-22). The reference NLLs are
    constants (``stop_gradient``)."""
    for name, x in (("nll_rejected", nll_rejected), ("nll_chosen_ref", nll_chosen_ref)):
        _check_same(("nll_chosen", name), nll_chosen, x)
    if beta <= 0:
        raise ConfigError(f"DPO beta must be > 0, got {beta}")
    sg = jax.lax.stop_gradient
    win = -(nll_chosen - sg(nll_chosen_ref))
    lose = -(nll_rejected - sg(nll_rejected_ref))
    return -(2.0 / beta) * jnp.mean(jax.nn.log_sigmoid(beta * (win - lose)))


# --------------------------------------------------------- token-weighted and logit-level forget losses


def _answer_mean(x: Array, mask: Array) -> Array:
    """The mean of ``x [B, T]`` over every answer token of the batch (``mask``): the ``[labels !=
    -100].mean()`` of open-unlearning's token-level losses."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def wga_loss(logp: Array, mask: Array, *, beta: float = 1.0) -> Array:
    """Weighted gradient ascent (WGA; Wang et al. 2025, "Rethinking LLM Unlearning Objectives",
    arXiv 2502.19301) as open-unlearning src/trainer/utils.py l. 102-115 (``compute_wga_loss``):
    ``L = -mean_t[sg(p_t^β)·(-log p_t)]`` over the answer tokens of the batch, ``p_t`` the model's
    probability of answer token t (``logp [B, T]`` its log, ``mask [B, T]`` the answer tokens).
    Minimising L ascends each token's NLL with a weight that vanishes once the token is forgotten."""
    _check_mask("logp", logp, mask)
    lp = logp.astype(jnp.float32)
    w = jax.lax.stop_gradient(jnp.exp(beta * lp))
    return _answer_mean(w * lp, mask)


def satimp_loss(logp: Array, mask: Array, *, beta1: float = 5.0, beta2: float = 1.0) -> Array:
    """SatImp (Yang et al. 2025, arXiv 2505.11953) as open-unlearning src/trainer/utils.py
    l. 118-134 (``compute_satimp_loss``): WGA with the weight ``sg(p_t^β1·(1 - p_t)^β2)``, a
    saturation term ``p^β1`` and an importance term ``(1 - p)^β2``."""
    _check_mask("logp", logp, mask)
    lp = logp.astype(jnp.float32)
    p = jnp.exp(lp)
    w = jax.lax.stop_gradient(p**beta1 * (1.0 - p) ** beta2)
    return _answer_mean(w * lp, mask)


def ceu_loss(logits: Array, targets: Array, mask: Array) -> Array:
    """CE-U, cross-entropy unlearning (Yang et al. 2025, arXiv 2503.01224) as open-unlearning
    src/trainer/unlearn/ceu.py l. 7-61 (``cross_entropy_unlearning_loss``): the cross-entropy of the
    model's next-token distribution against ``q = softmax(sg(z))`` with the target token's logit set
    to -inf (q puts the model's own mass everywhere but on the answer token), averaged over the
    answer tokens ``mask [B, T]``; ``logits [B, T, V]`` predict ``targets [B, T]`` (already
    shifted). Its gradient in the logits is ``softmax(z) - q``: all of the target's probability,
    spread over the other tokens in proportion. The first answer tokens are left out by the caller
    (:func:`drop_first_answer_tokens`)."""
    z = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(targets, z.shape[-1], dtype=jnp.bool_)
    q = jax.nn.softmax(jnp.where(onehot, -jnp.inf, jax.lax.stop_gradient(z)), axis=-1)
    ce = -jnp.sum(q * jax.nn.log_softmax(z, axis=-1), axis=-1)
    return _answer_mean(ce, mask)


def drop_first_answer_tokens(mask: Array, n: int) -> Array:
    """``mask [B, T]`` without each row's first ``n`` answer tokens (ceu.py l. 69-74: CE-U leaves
    them out, arXiv 2503.01224's footnote on its training settings)."""
    m = jnp.asarray(mask).astype(jnp.int32)
    return (m * (jnp.cumsum(m, axis=-1) > n)).astype(jnp.asarray(mask).dtype)


def pdu_forget_loss(logits: Array, mask: Array) -> Array:
    """PDU's forget loss (Entesari et al. 2025, arXiv 2506.05314) as open-unlearning
    src/trainer/unlearn/pdu.py l. 113-122: ``mean_t (max_v z_tv - mean_v z_tv)²``, the squared gap
    between each position's largest and mean logit (zero for a uniform prediction), averaged over
    the positions of the answer tokens. As that code, the logits are *not* shifted: ``logits
    [B, T, V]`` and ``mask [B, T]`` are taken at the same positions (the logits that predict the
    token after each answer token)."""
    z = logits.astype(jnp.float32)
    gap = jnp.max(z, axis=-1) - jnp.mean(z, axis=-1)
    return _answer_mean(jnp.square(gap), mask)
