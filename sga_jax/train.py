"""The training loop: data order, optimizer, model split / merge, the jitted step, ``train_loop``.

One jitted step per method (:class:`sga_jax.methods.Method`): the model is split (``nnx.split``)
into a graph definition, the trainable parameters and the frozen rest, and a pure function of
``(params, opt_state, batch)`` computes the method's loss on the forget rows (plus normal / retain /
template rows where the method needs them), its gradients (accumulated over ``grad_accum``
micro-batches inside the step with ``lax.scan``), passes them through ``optax.chain(<method
transform>, clip, adamw)`` and returns the new state; parameters and optimizer state are donated.

``train_loop`` runs the steps and calls its hooks, ``(every, fn)`` pairs as levanter's
``Trainer.add_hook``: the divergence guard, evaluation, logging, progress and checkpointing are
hooks; callers add their own. Loading, the run folder and export decisions live in
:mod:`sga_jax.runner`.

Resumability: the rows of step ``s`` are a function of ``(seed, s)`` only (epoch ``e`` is a fixed
permutation seeded by ``(seed, e)``), so a run stopped after a checkpoint and resumed takes exactly
the same steps as one that was never stopped.

Divergence guard: a step whose loss or forget NLL is NaN / inf, or whose forget NLL exceeds
``train.max_forget_nll``, stops the run with :class:`~sga_jax.errors.DivergenceError`. The forget NLL
of step ``s`` is measured on the parameters of checkpoint ``s`` (before the update), so that
checkpoint is deleted and the newest remaining one, whose parameters were measured good, is kept.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sga_jax import config as C
from sga_jax.checkpoint import Checkpointer
from sga_jax.errors import ConfigError, DivergenceError
from sga_jax.methods import Method, build_method
from sga_jax.metrics_log import MetricsLog
from sga_jax.models.hf import save_model
from sga_jax.models.lora import has_lora, lora_filter
from sga_jax.models.sharding import batch_sharding
from sga_jax.optim import make_optimizer, steps_per_epoch, total_steps
from sga_jax.progress import progress_bar
from sga_jax.reference import reference_model, reference_params, trainable_mask
from sga_jax.transforms.primal_dual import dual_record
from sga_jax.transforms.sga import rate_record, warn_rate_range

Batch = dict[str, np.ndarray]
_KEYS = ("input_ids", "attention_mask", "loss_mask")


# ----------------------------------------------------------------------------------- data order


@dataclasses.dataclass
class TrainData:
    """Tokenised training data (int32 numpy arrays ``[rows, T]`` with ``input_ids``,
    ``attention_mask``, ``loss_mask``).

    ``forget``: the rows to unlearn (or to learn, in finetune mode). ``retain``: the retain pool
    (retain NLL terms, GRU, SGA's normal samples). ``normal_index [N, K-1]``: for each forget row the
    rows of ``normal`` (when given: SGA normal samples read from a file) or else of ``retain`` that
    are its SGA normal samples. ``template``: FLAT template-answer rows, ``template_epochs`` blocks
    of one row per forget row (block ``e mod template_epochs`` serves epoch e: a new template per
    row per epoch, or one block for a fixed template). ``idk``: IdK-answer rows in the same
    layout (``idk_epochs`` blocks). ``ref_nll [N]``: the starting model's *summed* forget NLLs
    (NPO), filled in by the runner.
    """

    forget: Batch
    retain: Batch | None = None
    normal_index: np.ndarray | None = None
    template: Batch | None = None
    ref_nll: np.ndarray | None = None
    normal: Batch | None = None
    template_epochs: int = 1
    idk: Batch | None = None
    idk_epochs: int = 1

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
    for key in ("template", "idk"):  # one row per forget row, a block per epoch
        if getattr(data, key) is not None:
            epoch = _epochs(data.num_forget, step * batch_size, batch_size) % getattr(data, f"{key}_epochs")
            out[key] = _rows(getattr(data, key), epoch * data.num_forget + idx)
    if data.ref_nll is not None:
        out["ref_nll"] = data.ref_nll[idx].astype(np.float32)

    def split(x):
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

    return jax.tree.map(split, out)


# ---------------------------------------------------------------------------------------- state


def trainable_filter(freeze: Sequence[str]):
    """``nnx`` filter of the trainable parameters: every ``nnx.Param`` whose path matches none of
    the ``freeze`` regexes."""
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
    graphdef, params, rest = nnx.split(model, nnx.All(lora_filter(model), trainable_filter(freeze)), ...)
    if not jax.tree.leaves(params):
        raise ConfigError(f"model.freeze={list(freeze)} leaves no parameter to train")
    return graphdef, params, rest


def make_step(graphdef, rest, method: Method, tx, *, donate: bool = True, bind_rest: bool = True, ref=None):
    """The jitted train step ``(params, opt_state, batch) -> (params, opt_state, metrics)``.

    ``rest`` (frozen parameters, buffers) is an argument of the jitted function, not a closure:
    closed-over arrays would be baked into the program as constants (a frozen 49152 x 576 embedding
    made XLA's constant folding take minutes). ``bind_rest=False`` returns the jitted
    ``(params, opt_state, rest, batch, ref=None)`` function itself. A method with
    ``method.reference`` gets the frozen reference model as ``loss(model, batch, ref=...)``, built
    from ``ref`` (:mod:`sga_jax.reference`: the starting trainable parameters, or None with LoRA)."""
    names = list(method.extra)

    def micro_grads(params, rest, ref, mb):
        ref_model = reference_model(graphdef, params, ref, rest) if method.reference else None

        def main(p):
            model = nnx.merge(graphdef, p, rest)
            return method.loss(model, mb, ref=ref_model) if method.reference else method.loss(model, mb)

        (loss, aux), g = jax.value_and_grad(main, has_aux=True)(params)
        extra = {}
        for name in names:
            fn = method.extra[name]
            value, extra[name] = jax.value_and_grad(lambda p, fn=fn: fn(nnx.merge(graphdef, p, rest), mb))(
                params
            )
            if name in method.extra_values:
                extra[method.extra_values[name]] = value
        return g, extra, loss, aux

    def step(params, opt_state, rest, batch, ref=None):
        accum = jax.tree.leaves(batch)[0].shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        out_shape = jax.eval_shape(micro_grads, params, rest, ref, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

        def body(carry, mb):
            new = micro_grads(params, rest, ref, mb)
            return jax.tree.map(jnp.add, carry, new), None

        total, _ = jax.lax.scan(body, zeros, batch)
        grads, extra, loss, aux = jax.tree.map(lambda x: x / accum, total)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        grad_norm = optax.tree_utils.tree_norm(grads)
        values = {k: extra[k] for k in method.extra_values.values()}
        metrics = {**({"loss": loss} if method.report_loss else {}), **aux, **values, "grad_norm": grad_norm}
        metrics.update(rate_record(opt_state))
        metrics.update(dual_record(opt_state))
        return params, opt_state, metrics

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return _bind_rest(jitted, rest, ref) if bind_rest else jitted


def _bind_rest(jitted: Callable, rest, ref=None) -> Callable:
    """``(params, opt_state, batch) -> ...`` with ``rest`` (and the reference's ``ref``) passed to
    the jitted step as arguments."""

    def run_step(params, opt_state, batch):
        return jitted(params, opt_state, rest, batch, ref)

    return run_step


# What a run's config may change without changing its training (bookkeeping only).
BOOKKEEPING = (
    "stop_after",
    "resume",
    "progress",
    "checkpoint_every",
    "final_checkpoint",
    "keep_checkpoints",
    "log_every",
)


def step_key(cfg: C.RunConfig, steps: int) -> tuple:
    """What makes two runs' train steps the same program: the mode, the method config (its class
    and field values), the non-bookkeeping train settings, the step count and the frozen patterns."""
    train_cfg = {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(cfg.train)}
    m = cfg.method
    return (
        cfg.mode,
        type(m).__name__,
        dataclasses.astuple(m),
        tuple(sorted((k, v) for k, v in train_cfg.items() if k not in BOOKKEEPING)),
        steps,
        tuple(cfg.model.freeze),
    )


class StepCache:
    """Compiled train steps reused across runs in one process whose step is the same program (a
    resumed run, a sweep's repeats, tests), keyed on the model's graph definition and
    :func:`step_key`; the ``size`` most recent are kept. ``SHARED_STEPS`` is the one
    :func:`train_loop` uses unless given another (``StepCache(0)`` never reuses)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._steps: dict[Any, Callable] = {}

    def step(self, graphdef, rest, method: Method, tx, key: tuple, ref=None) -> Callable:
        """``make_step(graphdef, rest, method, tx, ref=ref)``, compiled once per ``(graphdef, key)``."""
        try:
            full = (graphdef, key)
            hash(full)
        except TypeError:  # an unhashable graph definition: no reuse
            return make_step(graphdef, rest, method, tx, ref=ref)
        jitted = self._steps.get(full)
        if jitted is None:
            jitted = make_step(graphdef, None, method, tx, bind_rest=False)
            if self.size:
                self._steps[full] = jitted
            while len(self._steps) > self.size:
                self._steps.pop(next(iter(self._steps)))
        return _bind_rest(jitted, rest, ref)


SHARED_STEPS = StepCache()


def current_r(opt_state) -> jax.Array | None:
    """The smoothing rate an ``sga`` transform state recorded this step (per-step-r mode)."""
    r = optax.tree_utils.tree_get(opt_state, "r")
    return None if r is None else r


def _all_finite(tree) -> bool:
    return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))))


# ------------------------------------------------------------------------------------------ loop


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    model_dir: Path | None
    steps: int
    history: list[dict[str, Any]]
    model: Any = None
    eval: dict[str, Any] | None = None


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step: ``step`` steps done (of ``total``; this run stops at
    ``stop``), the step's metrics ``record`` (hooks may add to it) and the new state."""

    step: int
    stop: int
    total: int
    record: dict[str, Any]
    params: Any
    opt_state: Any
    model: Callable[[], Any]  # the model with the current parameters (built on demand)


class Hook(NamedTuple):
    """``fn(info)`` after every step whose number ``every`` divides, and after the last step of the
    run (``every = 0``: after the last step only). Hooks run in the order given."""

    every: int
    fn: Callable[[StepInfo], None]


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
    hooks: Sequence[Hook] = (),
    step_cache: StepCache | None = None,
) -> RunResult:
    """Train ``model`` in place on ``data`` as ``cfg`` says into ``output_dir`` (validated: this
    writes). ``evaluate(model) -> {name: float}`` runs before the first step, every ``eval_every``
    steps and after the last; ``hooks`` run after the built-in ones (guard, evaluation, logging,
    progress, checkpoint); ``step_cache`` reuses compiled steps (default :data:`SHARED_STEPS`)."""
    t_cfg, out = cfg.train, Path(output_dir)
    steps = total_steps(t_cfg, data.num_forget)
    method, tx, schedule, (graphdef, params, rest), ref = method_setup(model, cfg, steps, data.num_forget)
    opt_state = tx.init(params)
    # In progress: keep two, so that the guard can drop the newest and still name a good one.
    ckpt = Checkpointer(out / "checkpoints", keep=max(t_cfg.keep_checkpoints, 2), cleanup=True)
    params, opt_state, start = _resumed(ckpt, params, opt_state, t_cfg.resume)
    step_fn = (step_cache or SHARED_STEPS).step(graphdef, rest, method, tx, step_key(cfg, steps), ref)
    device_batch = _device_batches(data, t_cfg, mesh)
    stop = steps if t_cfg.stop_after is None else min(steps, t_cfg.stop_after)
    history: list[dict[str, Any]] = []
    log = MetricsLog(out / "metrics.jsonl", start)
    progress = progress_bar(cfg, steps, start)
    all_hooks = [*_builtin_hooks(cfg, ckpt, log, progress, evaluate, eval_every), *hooks]
    try:
        if start == 0 and evaluate is not None:  # the starting model, as step 0
            history.append({"step": 0, **_evaluated(evaluate, nnx.merge(graphdef, params, rest))})
            log.write(history[-1])
        for s in range(start, stop):
            t0 = time.perf_counter()
            params, opt_state, metrics = step_fn(params, opt_state, device_batch(s))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            rec = {"step": s + 1, **metrics, "lr": float(schedule(s)), "time": time.perf_counter() - t0}
            history.append(rec)
            info = StepInfo(s + 1, stop, steps, rec, params, opt_state,
                            lambda p=params: nnx.merge(graphdef, p, rest))  # fmt: skip
            for hook in all_hooks:
                if (hook.every and (s + 1) % hook.every == 0) or s + 1 == stop:
                    hook.fn(info)
    finally:
        for closable in (progress, log, ckpt):
            if closable is not None:
                closable.close()
    _say(warn_rate_range(history, cfg.method))
    nnx.update(model, params)  # the step donated the arrays ``model`` held: give it the trained ones
    model_dir = None
    if stop == steps and export:
        lora = cfg.model.lora.save if cfg.model.lora else "merged"  # PEFT adapter and/or merged weights
        model_dir = _export(model, out, tokenizer, t_cfg.keep_checkpoints, lora=lora)
    return RunResult(out, model_dir, stop, history, model)


def _say(line: str | None) -> None:
    if line:
        print(f"sga-jax: {line}", file=sys.stderr)


def method_setup(model, cfg: C.RunConfig, steps: int, num_rows: int | None = None):
    """``(method, tx, schedule, (graphdef, params, rest), ref)``: the method, its optimizer (with
    its parameter mask), the split model and the reference's parameters (:mod:`sga_jax.reference`;
    taken now, from the starting model, before any step donates ``params``). ``num_rows``: the
    forget (or finetuning) rows, which epoch counts are taken over (None: ``steps / train.epochs``
    steps an epoch)."""
    per_epoch = steps_per_epoch(cfg.train, steps, num_rows)
    method = build_method(cfg.method, cfg.mode, steps_per_epoch=per_epoch)
    graphdef, params, rest = split_model(model, cfg.model.freeze)
    lora = has_lora(model)
    mask = None
    # With LoRA the adapters are what trains; RMU's default trainable [".*"] (every weight) then
    # restricts nothing, while a narrower selection of base weights cannot apply.
    if method.trainable is not None and lora and tuple(method.trainable) != (".*",):
        raise ConfigError("method.trainable selects base weights: it does not apply with model.lora")
    if method.trainable is not None and not lora:
        mask = trainable_mask(model, params, method.trainable)
    tx, schedule = make_optimizer(cfg.train, steps, method.transform, mask, num_rows=num_rows)
    ref = None
    if method.reference:
        ref = reference_params(params, lora=lora, dtype=getattr(cfg.method, "ref_dtype", None))
    return method, tx, schedule, (graphdef, params, rest), ref


def _resumed(ckpt: Checkpointer, params, opt_state, resume: bool) -> tuple[Any, Any, int]:
    """``(params, opt_state, first step)``: from the newest intact checkpoint when resuming."""
    if not resume or ckpt.latest_step() is None:
        return params, opt_state, 0
    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
    restored, meta = ckpt.restore(None, abstract)
    return restored["params"], restored["opt_state"], int(meta["step"])


def _export(model, out: Path, tokenizer: Any, keep_checkpoints: int, *, lora: str = "merged") -> Path:
    model_dir = save_model(model, out / "model", tokenizer=tokenizer, overwrite=True, lora=lora)
    # The run ended well and its result is exported: the checkpoints only served resuming.
    prune_checkpoints(out / "checkpoints", keep_checkpoints)
    return model_dir


def _builtin_hooks(cfg: C.RunConfig, ckpt, log, progress, evaluate, eval_every: int) -> list[Hook]:
    """The loop's own hooks, in order: the divergence guard (before anything records the step),
    evaluation, logging, the progress bar, checkpointing."""
    t_cfg = cfg.train
    return [
        Hook(1, lambda i: _guard(i.record, i.step - 1, t_cfg, ckpt, cfg)),
        *_eval_hooks(evaluate, eval_every),
        Hook(t_cfg.log_every, lambda i: log.write(i.record)),
        *([Hook(1, progress.update_from)] if progress else []),
        Hook(t_cfg.checkpoint_every, _checkpoint_hook(t_cfg, ckpt)),
    ]


def _device_batches(data: TrainData, t_cfg: C.TrainConfig, mesh: Any) -> Callable[[int], Any]:
    """Step -> the step's batch on the devices (rows sharded over the mesh when there is one)."""
    sharding = None
    if mesh is not None:  # arrays are [accum, micro, ...]: shard the micro-batch rows
        sharding = NamedSharding(mesh, P(None, *batch_sharding(mesh).spec))

    def device_batch(s: int) -> Any:
        host = step_batch(data, s, t_cfg.batch_size, t_cfg.grad_accum, t_cfg.seed)
        if sharding is None:
            return jax.tree.map(jnp.asarray, host)
        return jax.tree.map(lambda x: jax.device_put(x, sharding), host)

    return device_batch


def _evaluated(evaluate: Callable[[Any], dict[str, float]], model) -> dict[str, float]:
    return {k: float(v) for k, v in evaluate(model).items()}


def _eval_hooks(evaluate, every: int) -> list[Hook]:
    """Evaluation every ``every`` steps and after the last step of the whole schedule."""
    if evaluate is None or not every:
        return []

    def fn(info: StepInfo) -> None:
        if info.step % every == 0 or info.step == info.total:
            info.record.update(_evaluated(evaluate, info.model()))

    return [Hook(every, fn)]


def _checkpoint_hook(t_cfg: C.TrainConfig, ckpt: Checkpointer) -> Callable[[StepInfo], None]:
    """Save every ``checkpoint_every`` steps, and at the end when asked to or when stopped early."""

    def fn(info: StepInfo) -> None:
        done = info.step
        periodic = t_cfg.checkpoint_every and done % t_cfg.checkpoint_every == 0
        final = done == info.stop and (t_cfg.final_checkpoint or info.stop < info.total)
        if not (periodic or final):
            return
        if not _all_finite(info.params):
            raise DivergenceError(
                f"training diverged after step {done}: parameters hold NaN/inf; " + _last_good(ckpt)
            )
        state = {"params": info.params, "opt_state": info.opt_state}
        ckpt.save(done, state, {"step": done, "metrics": info.record})

    return fn


def prune_checkpoints(directory: Path, keep: int) -> None:
    """After a run ended well: keep the ``keep`` newest checkpoints (and checksums.json in step with
    them, through the Checkpointer), or remove the folder when ``keep`` is 0."""
    if not directory.is_dir():
        return
    if keep == 0:
        shutil.rmtree(directory)
        return
    # The run ended well, so the newest checkpoints are good: the guard's extra "last good" one
    # (kept beyond ``keep`` while the run was in progress) is no longer needed.
    with Checkpointer(directory, keep=keep) as ckpt:
        for step in sorted(ckpt.all_steps(), reverse=True)[keep:]:
            ckpt.delete(step)


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


__all__ = [
    "BOOKKEEPING",
    "SHARED_STEPS",
    "Hook",
    "RunResult",
    "StepCache",
    "StepInfo",
    "TrainData",
    "make_optimizer",
    "make_step",
    "method_setup",
    "prune_checkpoints",
    "split_model",
    "step_batch",
    "step_key",
    "total_steps",
    "train_loop",
]
