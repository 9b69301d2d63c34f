"""The method registry: one typed builder per method config class, each giving a :class:`Method`.

A :class:`Method` is what the training loop (:mod:`sga_jax.train`) needs from a method: the loss
it differentiates, the extra gradients its optax transform takes, and that transform. The data a
method trains on is declared on its schema (``method.needs``, in the jax-free :mod:`sga_jax.config`).
Adding a method touches known places only: its schema (``config/methods.py`` or
``config/baselines.py``, its name in ``BASE_METHODS``), its builder in :data:`BUILDERS` here (or,
for a method without a training loop such as K-FADE, its driver in :data:`sga_jax.runner.DRIVERS`),
its ``configs/method/<name>.yaml`` and its test::

    method = build_method(C.NPOConfig(beta=0.1))   # dispatched on the config class
    loss, aux = method.loss(model, batch)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sga_jax import config as C
from sga_jax import objectives as O  # noqa: N812
from sga_jax import transforms as T  # noqa: N812
from sga_jax.errors import ConfigError
from sga_jax.logprobs import num_targets, sequence_nll, token_logprobs

LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass
class Method:
    """How a method turns batches into gradients.

    ``loss(model, batch) -> (loss, aux)`` is differentiated for the updates; each of ``extra``
    ``name -> fn(model, batch) -> scalar`` is differentiated too and its gradient handed to the
    method's optax transform as the keyword ``name`` (SGA's normal-sample gradient, GRU's retain
    gradient). ``needs``: which parts of :class:`~sga_jax.train.TrainData` the method uses (the
    schema's ``needs``). ``reference``: the loss is called ``loss(model, batch, ref=ref_model)``
    with the frozen starting model (:mod:`sga_jax.reference`). ``trainable``: regexes on HF
    parameter names selecting what trains (None: everything the model trains). ``extra_values``:
    ``extra name -> keyword``: the value of that extra loss is handed to the transform too, under
    the keyword (PDU's dual step reads the retain loss).
    """

    loss: LossFn
    transform: optax.GradientTransformation | None = None
    extra: dict[str, Callable[[Any, dict], jax.Array]] = dataclasses.field(default_factory=dict)
    needs: frozenset[str] = frozenset()
    report_loss: bool = True  # False when ``loss`` is not the method's objective (SGA's per-step r)
    reference: bool = False
    trainable: tuple[str, ...] | None = None
    extra_values: dict[str, str] = dataclasses.field(default_factory=dict)


def add_grads() -> optax.GradientTransformationExtraArgs:
    """Adds the extra arg ``added_grads`` (a gradient pytree) to the incoming updates: a loss term
    that must stay out of the updates of an earlier transform in the chain (SGA's per-step r)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, added_grads=None, **extra_args):
        del params, extra_args
        if added_grads is None:
            return updates, state
        return jax.tree.map(lambda u, g: u + g.astype(u.dtype), updates, added_grads), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------------------ NLL terms


def plain_nll(m: C.MethodConfig, model, batch) -> jax.Array:
    """The batch NLL of a plain NLL term under ``method.loss_reduction``: ``token`` averages over all
    answer tokens of the (micro-)batch, as open-unlearning's HF ``outputs.loss``; ``sequence``
    averages the per-row token means."""
    nll = sequence_nll(model, batch)
    return O.reduce_nll(nll, num_targets(batch) if m.loss_reduction == "token" else None)


def _retain_term(m: C.MethodConfig, model, batch, aux: dict) -> jax.Array:
    if m.retain_weight == 0:
        return jnp.float32(0.0)
    nll_r = plain_nll(m, model, batch["retain"])
    aux["retain_nll"] = nll_r
    return m.retain_weight * nll_r


# ------------------------------------------------------------------------------------- builders


def build_finetune() -> Method:
    """Plain NLL on the ``forget`` (finetuning) rows: TOFU's first stage."""

    def loss(model, batch):
        nll = sequence_nll(model, batch["forget"])
        return O.nll_loss(nll), {"forget_nll": jnp.mean(nll)}

    return Method(loss)


def build_ga(m: C.GAConfig) -> Method:
    # open-unlearning src/trainer/unlearn/grad_ascent.py l. 12-13 (token average by default).
    def loss(model, batch):
        nll_f = plain_nll(m, model, batch["forget"])
        aux = {"forget_nll": nll_f}
        return O.ga_loss(nll_f[None]) + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs)


def build_graddiff(m: C.GradDiffConfig) -> Method:
    # open-unlearning src/trainer/unlearn/grad_diff.py l. 49-60: -forget loss + alpha * retain loss.
    def loss(model, batch):
        nll_f = plain_nll(m, model, batch["forget"])
        nll_r = plain_nll(m, model, batch["retain"])
        aux = {"forget_nll": nll_f, "retain_nll": nll_r}
        return O.graddiff_loss(nll_f[None], nll_r[None], alpha=m.retain_weight), aux

    return Method(loss, needs=m.needs)


def build_npo(m: C.NPOConfig) -> Method:
    # open-unlearning src/trainer/unlearn/npo.py l. 15-31 with utils.py compute_dpo_loss: the
    # *summed* answer NLL against the reference (starting) model's summed NLL.
    def loss(model, batch):
        # One forward: the summed NLL for the loss and the token mean for the log, from one logp.
        logp, mask = token_logprobs(model, batch["forget"])
        nll = -jnp.sum(logp * mask.astype(jnp.float32), axis=-1)
        aux = {"forget_nll": jnp.mean(O.sequence_nll_from_logprobs(logp, mask))}
        loss = O.npo_loss(nll, batch["ref_nll"], beta=m.beta)
        return loss + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs)


def build_simnpo(m: C.SimNPOConfig) -> Method:
    # open-unlearning src/trainer/unlearn/simnpo.py l. 18-30 (token-mean NLL, margin delta).
    def loss(model, batch):
        nll = sequence_nll(model, batch["forget"])
        aux = {"forget_nll": jnp.mean(nll)}
        loss = O.simnpo_loss(nll, beta=m.beta, gamma=m.gamma, forget_weight=m.forget_weight)
        return loss + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs)


def build_flat(m: C.FLATConfig) -> Method:
    def loss(model, batch):
        logp_f, mask_f = token_logprobs(model, batch["forget"])
        logp_t, mask_t = token_logprobs(model, batch["template"])
        nll_f = O.sequence_nll_from_logprobs(logp_f, mask_f)
        aux = {
            "forget_nll": jnp.mean(nll_f),
            "template_nll": jnp.mean(O.sequence_nll_from_logprobs(logp_t, mask_t)),
        }
        loss = O.flat_loss(logp_f, mask_f, logp_t, mask_t, divergence=m.divergence)
        return loss + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs)


def build_sga(m: C.SGAConfig) -> Method:
    """SGA with a fixed r (the loss itself) or a per-step r* (the ``sga`` transform)."""
    return _sga_fixed(m) if m.rate == "fixed" else _sga_per_step(m)


def _sga_fixed(m: C.SGAConfig) -> Method:
    # With a fixed r the SGA direction is exactly jax.grad of the SGA loss (eq. 6).
    k = m.k

    def loss(model, batch):
        nll_f = sequence_nll(model, batch["forget"])
        aux = {"forget_nll": jnp.mean(nll_f), "r": jnp.float32(m.r)}
        if k > 1:
            nll_n = sequence_nll(model, batch["normal"]).reshape(nll_f.shape[0], k - 1)
            aux["normal_nll"] = jnp.mean(nll_n)
        else:
            nll_n = jnp.zeros((nll_f.shape[0], 0), jnp.float32)
        loss = O.sga_loss(nll_f, nll_n, m.r)
        return loss + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs)


def _sga_per_step(m: C.SGAConfig) -> Method:
    # Per-step r* ("paper" or "min_norm"): the transform takes g_f (the gradient of the mean forget
    # NLL, and nothing else) as its updates and the normal-sample gradient as an extra arg; a retain
    # term is added to its output afterwards (``add_grads``), never mixed into g_f.
    def loss(model, batch):
        nll_f = sequence_nll(model, batch["forget"])
        aux = {"forget_nll": jnp.mean(nll_f)}
        if m.retain_weight:
            aux["retain_nll"] = plain_nll(m, model, batch["retain"])
        return jnp.mean(nll_f), aux

    extra: dict[str, Callable] = {}
    if m.k > 1:

        def normal_loss(model, batch):
            return jnp.mean(sequence_nll(model, batch["normal"]))

        extra["normal_grads"] = normal_loss
    parts = [T.sga(r=m.r, K=m.k, rate=m.rate, r_min=m.r_min, r_max=m.r_max, fallback=m.fallback)]
    if m.retain_weight:

        def retain_term(model, batch):
            return m.retain_weight * plain_nll(m, model, batch["retain"])

        extra["added_grads"] = retain_term
        parts.append(add_grads())
    transform = optax.chain(*parts) if len(parts) > 1 else parts[0]
    # report_loss=False: the loss is only l_f here; the SGA loss depends on the r* of the step.
    return Method(loss, transform, extra, m.needs, report_loss=False)


def build_gru(m: C.GRUMixin) -> Method:
    """GRU (arXiv 2503.09117) over its base method: the base's Method with the ``gru`` transform
    chained after the base's own, fed the retain-set gradient."""
    base = _builder(C.method_schema(m.base))(m)

    def retain_loss(model, batch):
        return plain_nll(m, model, batch["retain"])  # type: ignore[arg-type]

    gru = T.gru(m=m.momentum, clip=m.clip)
    transform = gru if base.transform is None else optax.chain(base.transform, gru)
    extra = {**base.extra, "retain_grads": retain_loss}
    return dataclasses.replace(base, transform=transform, extra=extra, needs=m.needs)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ methods with a frozen reference


def _forget_logits(model, f) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(logits [B, T-1, V], targets [B, T-1], mask [B, T-1])``: the full next-token logits of the
    forget rows with their (shifted) answer tokens."""
    ids = jnp.asarray(f["input_ids"])
    return model(ids, f["attention_mask"])[:, :-1], ids[:, 1:], jnp.asarray(f["loss_mask"])[:, 1:]


def _summed_nll(model, b) -> tuple[jax.Array, jax.Array]:
    """``(summed answer NLL [B], token-mean NLL [B])`` from one forward."""
    logp, mask = token_logprobs(model, b)
    return -jnp.sum(logp * mask.astype(jnp.float32), axis=-1), O.sequence_nll_from_logprobs(logp, mask)


def build_rmu(m: C.RMUConfig) -> Method:
    """RMU as open-unlearning src/trainer/unlearn/rmu.py l. 139-173 (forget: layer-``layer``
    activations of the forget answer tokens toward the steering vector, l. 147-161; retain:
    ``EMBED_DIFF``, the same layer's retain activations toward the frozen model's, l. 119-134;
    ``gamma·L_f + alpha·L_r``, l. 171); only ``trainable`` parameters move (l. 43-48)."""
    layer = m.layer

    def act(model, b):
        return model.layer_outputs(b["input_ids"], b["attention_mask"], layers=(layer,))[layer]

    def loss(model, batch, *, ref):
        f, r = batch["forget"], batch["retain"]
        h_f = act(model, f)
        c = O.rmu_control_vector(h_f.shape[-1], m.steering_coeff, m.control_seed).astype(h_f.dtype)
        forget = O.rmu_activation_loss(h_f, c, f["loss_mask"])
        retain = O.rmu_activation_loss(act(model, r), act(ref, r), r["loss_mask"])
        aux = {"forget_mse": forget, "retain_mse": retain}
        return m.forget_weight * forget + m.retain_weight * retain, aux

    return Method(loss, needs=m.needs, reference=True, trainable=tuple(m.trainable))


def build_undial(m: C.UNDIALConfig) -> Method:
    """UNDIAL as open-unlearning src/trainer/unlearn/undial.py l. 12-27 with utils.py l. 70-99
    (``compute_undial_loss``); the full ``[B, T, V]`` logits of model and reference are formed."""

    def loss(model, batch, *, ref):
        f = batch["forget"]
        logits, targets, mask = _forget_logits(model, f)
        ref_logits, _, _ = _forget_logits(ref, f)
        forget = O.undial_loss(logits, ref_logits, targets, mask, beta=m.beta)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
        aux = {"forget_nll": jnp.mean(O.sequence_nll_from_logprobs(logp * mask, mask)), "undial": forget}
        return m.forget_weight * forget + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs, reference=True)


def build_idk_dpo(m: C.IdkDPOConfig) -> Method:
    """IdkDPO as open-unlearning src/trainer/unlearn/dpo.py l. 12-33: ``compute_dpo_loss`` with
    the IdK answer as ``win_inputs`` and the forget answer as ``lose_inputs``, reference = the
    frozen starting model, plus ``alpha``·retain NLL."""

    def loss(model, batch, *, ref):
        f, k = batch["forget"], batch["idk"]
        lose, lose_mean = _summed_nll(model, f)
        win, win_mean = _summed_nll(model, k)
        lose_ref, _ = _summed_nll(ref, f)
        win_ref, _ = _summed_nll(ref, k)
        aux = {"forget_nll": jnp.mean(lose_mean), "idk_nll": jnp.mean(win_mean)}
        forget = O.dpo_loss(win, lose, win_ref, lose_ref, beta=m.beta)
        return m.forget_weight * forget + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs, reference=True)


def build_idk_nll(m: C.IdkNLLConfig) -> Method:
    """IdkNLL as locuslab/tofu dataloader.py (``CustomTrainerForgetting.compute_loss``,
    ``loss_type == "idk"``): one HF ``outputs.loss`` over the concatenated IdK + retain batch,
    ``(Σ l_idk + w·Σ l_retain) / (n_idk + n_retain)`` over answer tokens (w = ``retain_weight``)."""

    def loss(model, batch):
        k, r = batch["idk"], batch["retain"]
        s_k, mean_k = _summed_nll(model, k)
        s_r, mean_r = _summed_nll(model, r)
        n = jnp.sum(num_targets(k)) + jnp.sum(num_targets(r))
        aux = {"idk_nll": jnp.mean(mean_k), "retain_nll": jnp.mean(mean_r)}
        return (jnp.sum(s_k) + m.retain_weight * jnp.sum(s_r)) / n, aux

    return Method(loss, needs=m.needs)


# ------------------------------------------------- methods with a forget loss of their own (open-unlearning)


def _token_weighted(m, weighted: Callable[[jax.Array, jax.Array], jax.Array]) -> Method:
    def loss(model, batch):
        logp, mask = token_logprobs(model, batch["forget"])
        aux = {"forget_nll": jnp.mean(O.sequence_nll_from_logprobs(logp, mask))}
        forget = weighted(logp, mask)
        aux["forget_loss"] = forget
        return m.forget_weight * forget + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs)


def build_wga(m: C.WGAConfig) -> Method:
    """WGA as open-unlearning src/trainer/unlearn/wga.py l. 14-36 (``gamma·L_f + alpha·l_r``) with
    utils.py l. 102-115 (``compute_wga_loss``)."""
    return _token_weighted(m, lambda logp, mask: O.wga_loss(logp, mask, beta=m.beta))


def build_satimp(m: C.SatImpConfig) -> Method:
    """SatImp as open-unlearning src/trainer/unlearn/satimp.py l. 17-37 with utils.py l. 118-134."""
    return _token_weighted(m, lambda logp, mask: O.satimp_loss(logp, mask, beta1=m.beta1, beta2=m.beta2))


def build_ceu(m: C.CEUConfig) -> Method:
    """CE-U as open-unlearning src/trainer/unlearn/ceu.py l. 64-96 (``compute_batch_ceu``: the
    first ``ignore_first_n_answer_tokens`` answer tokens of each row left out, l. 69-74)."""

    def loss(model, batch):
        f = batch["forget"]
        kept = dict(f, loss_mask=O.drop_first_answer_tokens(f["loss_mask"], m.ignore_first_n_answer_tokens))
        logits, targets, mask = _forget_logits(model, kept)
        forget = O.ceu_loss(logits, targets, mask)
        aux = {"forget_loss": forget}
        return forget + _retain_term(m, model, batch, aux), aux

    return Method(loss, needs=m.needs)


def build_pdu(m: C.PDUConfig, *, steps_per_epoch: int = 1) -> Method:
    """PDU as open-unlearning src/trainer/unlearn/pdu.py: the forget loss of l. 113-122
    (``objectives.pdu_forget_loss``, on unshifted logits as there) is the loss; the retain NLL's
    gradient and value go to :func:`sga_jax.transforms.primal_dual`, which adds ``λ·∇l_r`` and
    moves λ (l. 40-72). λ moves once per optimizer step, from the step's mean retain NLL;
    open-unlearning moves it at every ``compute_loss`` call, i.e. per micro-batch under gradient
    accumulation (the same with ``train.grad_accum=1``). Its warm-up ends at an epoch's end
    (``on_epoch_end``, l. 143-147): ``ceil(dual_warmup_epochs)·steps_per_epoch`` steps."""

    def loss(model, batch):
        f = batch["forget"]
        ids = jnp.asarray(f["input_ids"])
        forget = O.pdu_forget_loss(model(ids, f["attention_mask"]), jnp.asarray(f["loss_mask"]))
        return m.forget_weight * forget, {"forget_loss": forget}

    def retain_loss(model, batch):
        return plain_nll(m, model, batch["retain"])

    warmup = math.ceil(m.dual_warmup_epochs) * steps_per_epoch
    tx = T.primal_dual(
        m.retain_weight, eps=m.retain_loss_eps, step_size=m.dual_step_size, warmup_steps=warmup
    )
    # report_loss=False: the objective's λ lives in the transform state (reported as ``dual``).
    return Method(loss, tx, {"retain_grads": retain_loss}, m.needs, report_loss=False,
                  extra_values={"retain_grads": "retain_loss"})  # fmt: skip


BUILDERS: dict[type, Callable[[Any], Method]] = {
    C.GAConfig: build_ga,
    C.GradDiffConfig: build_graddiff,
    C.NPOConfig: build_npo,
    C.SimNPOConfig: build_simnpo,
    C.SGAConfig: build_sga,
    C.FLATConfig: build_flat,
    C.RMUConfig: build_rmu,
    C.UNDIALConfig: build_undial,
    C.IdkDPOConfig: build_idk_dpo,
    C.IdkNLLConfig: build_idk_nll,
    C.WGAConfig: build_wga,
    C.SatImpConfig: build_satimp,
    C.CEUConfig: build_ceu,
    C.PDUConfig: build_pdu,
}


def _builder(cls: type) -> Callable[[Any], Method]:
    if issubclass(cls, C.GRUMixin):
        return build_gru
    for klass in cls.__mro__:
        if klass in BUILDERS:
            return BUILDERS[klass]
    raise ConfigError(f"method: {cls.__name__} has no training loop (K-FADE runs through its own driver)")


def build_method(m: C.MethodConfig, mode: str = "unlearn", *, steps_per_epoch: int = 1) -> Method:
    """The :class:`Method` of a method config (``mode="finetune"``: plain NLL). ``steps_per_epoch``:
    optimizer steps per pass over the forget set, for a method that counts epochs (PDU's dual
    warm-up)."""
    if mode == "finetune":
        return build_finetune()
    if isinstance(m, C.PDUConfig):
        return build_pdu(m, steps_per_epoch=steps_per_epoch)
    return _builder(type(m))(m)


__all__ = [
    "BUILDERS",
    "Method",
    "add_grads",
    "build_ceu",
    "build_finetune",
    "build_flat",
    "build_ga",
    "build_graddiff",
    "build_gru",
    "build_idk_dpo",
    "build_idk_nll",
    "build_method",
    "build_npo",
    "build_pdu",
    "build_rmu",
    "build_satimp",
    "build_sga",
    "build_simnpo",
    "build_undial",
    "build_wga",
    "plain_nll",
]
