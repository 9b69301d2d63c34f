"""``sga-jax plan``: will a run's train step fit a TPU slice (or N CPU devices), and how fast can it be?

The step is compiled ahead of time, on abstract arrays only (``jax.ShapeDtypeStruct`` with the
run's NamedShardings; no weight is read or allocated), for the devices of a TPU topology that
libtpu describes without the hardware (``jax.experimental.topologies``), or for N simulated CPU
devices. It is the runner's own step: :func:`sga_jax.train.method_setup` (method, optimizer,
trainable split, frozen reference) and :func:`sga_jax.train.make_step` on the batch layout of
:func:`sga_jax.train.step_batch` (``[grad_accum, micro, T]`` rows sharded over data x fsdp, T =
``data.max_length``, the longest a batch can be). The compiler's buffer assignment
(``memory_analysis``) gives the per-chip argument / output / temporary bytes, its cost analysis
the FLOPs and bytes accessed per step, and the chip's datasheet peaks a roofline *lower bound* on
the step time (max of FLOPs / peak FLOP/s and bytes / HBM bandwidth; collectives, host input and
imperfect overlap are not in it).

When the step does not fit, a few other settings (mesh fsdp x tensor splits, remat policy,
micro-batches through ``train.grad_accum``) are compiled and the fitting one with the lowest bound
is suggested (:func:`format_report` prints the result). Compiling a 7B step takes minutes on a
small machine.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from sga_jax import config as C
from sga_jax.errors import ConfigError, ModelLoadError, SgaJaxError
from sga_jax.plan_report import format_report  # noqa: F401 - the report's text form, with the plan
from sga_jax.plan_targets import Chip, Target, parse_target, target_devices

GB = 10**9
GiB = 2**30


_LLAMA = dict(model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu")
# Model shapes to plan without a model folder (the HF config.json fields that set the step's shapes).
PRESETS: dict[str, dict[str, Any]] = {
    # Llama 2 (Touvron et al. 2023, arXiv 2307.09288, table 1 / the HF configs).
    "llama2-7b": dict(_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096),
    "llama2-13b": dict(_LLAMA, vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       max_position_embeddings=4096),
    "llama2-70b": dict(_LLAMA, vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       max_position_embeddings=4096),
    # Llama 3.1 (meta-llama/Llama-3.1-8B config.json; rope_scaling leaves the shapes alone).
    "llama3.1-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=131072, rope_theta=500000.0),
}  # fmt: skip

# ----------------------------------------------------------------------------- abstract inputs


def model_config(cfg: C.RunConfig) -> tuple[dict[str, Any], str]:
    """``(HF config dict, where from)``: a preset name, or an HF folder's config.json (nothing else
    of the folder is read)."""
    from pathlib import Path

    from sga_jax.models.hf import read_config

    path = cfg.model.path or ""
    if path in PRESETS:
        return dict(PRESETS[path]), f"preset {path}"
    folder = Path(path).expanduser()
    if folder.is_dir():
        return read_config(folder), f"{folder}/config.json"
    raise ModelLoadError(
        f"model.path={path!r}: plan needs an HF folder with a config.json or a preset ({', '.join(PRESETS)})"
    )


def _placed(state, mesh, model_type: str):
    """An abstract state with every leaf's NamedSharding as the loader places it
    (:func:`sga_jax.models.sharding.sharding_for`; LoRA adapters fall to the replicated rule)."""
    import jax
    from flax import nnx

    from sga_jax.models.sharding import sharding_for

    def one(path, var):
        x = var.get_value()
        return path, var.replace(
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(path, x.shape, mesh, model_type))
        )

    return nnx.from_flat_state([one(p, v) for p, v in nnx.to_flat_state(state)])


def abstract_model(hf: dict[str, Any], cfg: C.RunConfig, mesh):
    """The run's model (LoRA adapters attached when configured) with abstract, sharded leaves."""
    from flax import nnx

    from sga_jax.models import from_config
    from sga_jax.models.lora import apply_lora

    m = cfg.model

    def build():
        model = from_config(
            hf, dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
            attention=m.attention,
        )  # fmt: skip
        return apply_lora(model, m.lora, nnx.Rngs(cfg.train.seed)) if m.lora is not None else model

    model = nnx.eval_shape(build)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _placed(state, mesh, model.config.model_type))


def abstract_opt_state(tx, params, mesh):
    """``tx.init(params)`` abstractly: a leaf at the path of a parameter (Adam's moments) takes its
    sharding, as ``tx.init`` on sharded parameters keeps it; everything else (counts, scalars) is
    replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    def key(path) -> tuple:
        return tuple(str(k) for k in path)

    by_path = {key(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, x):
        k = key(path)
        param = next((by_path[k[i:]] for i in range(len(k)) if k[i:] in by_path), None)
        sharding = param.sharding if param is not None and param.shape == x.shape else replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, params))


def stand_in_data(cfg: C.RunConfig):
    """A :class:`~sga_jax.train.TrainData` of zeros with the arrays a run of ``cfg`` trains on
    (``runner.needs``), ``batch_size`` forget rows of ``data.max_length`` tokens: its shapes are
    what :func:`sga_jax.train.step_batch` needs, its values never matter."""
    import numpy as np

    from sga_jax.runner import needs
    from sga_jax.train import TrainData

    need, n, t = needs(cfg), cfg.train.batch_size, cfg.data.max_length
    k = int(getattr(cfg.method, "k", 1))

    def rows(count: int) -> dict[str, np.ndarray]:
        return {key: np.zeros((count, t), np.int32) for key in ("input_ids", "attention_mask", "loss_mask")}

    data = TrainData(forget=rows(n))
    if "retain" in need:
        data.retain = rows(max(n, n * (k - 1)))
    if "normal" in need:
        data.normal_index = np.arange(n * (k - 1)).reshape(n, k - 1)
        if getattr(cfg.method, "normal_samples", None) == "file":
            data.normal = rows(n * (k - 1))
    for name in ("template", "idk"):
        if name in need:
            setattr(data, name, rows(n))
    if "ref_nll" in need:
        data.ref_nll = np.zeros(n, np.float32)
    return data


def abstract_batch(cfg: C.RunConfig, mesh):
    """Step 0's batch as the loop puts it on the devices: ``[grad_accum, micro, ...]``, the micro
    rows over data x fsdp (:func:`sga_jax.train._device_batches`)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sga_jax.models.sharding import BATCH
    from sga_jax.train import step_batch

    t = cfg.train
    host = step_batch(stand_in_data(cfg), 0, t.batch_size, t.grad_accum, t.seed)
    sharding = NamedSharding(mesh, P(None, BATCH))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), host)


# ------------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class StepPlan:
    """One compiled configuration: per-chip bytes, the compiler's per-step costs, the bound."""

    label: str
    overrides: list[str]
    mesh: dict[str, int]
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    peak_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    model_flops: float = 0.0
    trainable_params: int = 0
    rows: int = 0  # rows (and tokens) the step reads, over all chips
    tokens: int = 0
    compile_s: float = 0.0
    fits: bool | None = None
    bound_s: float | None = None
    bound_by: str | None = None
    error: str | None = None


def with_mesh(cfg: C.RunConfig) -> C.RunConfig:
    """``cfg`` with the default mesh (data 1, fsdp over every device, tensor 1) when it has none:
    a plan is for a slice, and a run without ``mesh:`` would use one device."""
    return cfg if cfg.mesh is not None else dataclasses.replace(cfg, mesh=C.MeshConfig())


def used_groups(lowered, args: tuple, batch) -> list[dict]:
    """The batch's row groups (forget, normal, retain, template ...) the step reads. ``step_batch``
    also carries rows a method never touches (SGA's retain pool: its normal rows are drawn from it
    on the host), and ``jax.jit`` drops unused arguments from the program; jax's list of the kept
    ones is private, so without it every group counts."""
    import jax

    groups = {k: g for k, g in batch.items() if isinstance(g, dict) and "input_ids" in g}
    try:
        kept = set(lowered._lowering.compile_args["kept_var_idx"])
    except (AttributeError, KeyError, TypeError):
        return list(groups.values())
    start = sum(len(jax.tree.leaves(a)) for a in args[:3])  # (params, opt_state, rest, batch, ref)
    index = {id(x): start + i for i, x in enumerate(jax.tree.leaves(batch))}
    return [g for g in groups.values() if any(index[id(x)] in kept for x in jax.tree.leaves(g))]


def _model_flops(model, groups: list[dict], chips: int, *, full: bool) -> float:
    """The rows' training FLOPs per chip by :func:`sga_jax.eval.flops.forward_flops` (dense T x T
    attention, as XLA attention computes it): 3 forwards when every weight trains (the backward's
    activation and weight gradients are a forward each), 2 when only adapters / some weights train
    (no weight gradient for the frozen ones). Without remat recomputation, a frozen reference's
    forward or optimizer work: a lower bound on what the step executes."""
    from sga_jax.eval.flops import forward_flops

    tokens = sum(math.prod(g["input_ids"].shape) for g in groups)
    pairs = sum(math.prod(g["input_ids"].shape) * g["input_ids"].shape[-1] for g in groups)
    return (3 if full else 2) * forward_flops(model.config, tokens, pairs) / chips


def _costs(compiled) -> tuple[float, float]:
    """``(FLOPs, bytes accessed)`` of one device's program (XLA's cost analysis)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def compile_step(cfg: C.RunConfig, hf: dict[str, Any], devices: Sequence, *, rows: int = 400) -> StepPlan:
    """Compile the runner's train step of ``cfg`` for ``devices`` on abstract arrays; fill in the
    bytes and costs. ``rows``: forget rows assumed for the step count (only the LR schedule's
    constants depend on it)."""
    import jax
    from flax import nnx

    from sga_jax.runner import DRIVERS, run_mesh
    from sga_jax.train import make_step, method_setup, total_steps

    if cfg.mode == "unlearn" and type(cfg.method) in DRIVERS:
        raise ConfigError(
            f"method {cfg.method.name}: runs its own driver, not the train step; plan covers the others"
        )
    mesh = run_mesh(cfg, devices)
    out = StepPlan("", [], dict(mesh.shape))
    model = abstract_model(hf, cfg, mesh)
    steps = total_steps(cfg.train, rows)
    method, tx, _, (graphdef, params, rest), ref = method_setup(model, cfg, steps, rows)
    opt_state = abstract_opt_state(tx, params, mesh)
    batch = abstract_batch(cfg, mesh)
    step = make_step(graphdef, None, method, tx, bind_rest=False)
    args = (params, opt_state, rest, batch, ref)
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    compiled = lowered.compile()
    out.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out.argument_bytes, out.output_bytes = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    out.alias_bytes, out.temp_bytes = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    out.peak_bytes = out.argument_bytes + out.output_bytes - out.alias_bytes + out.temp_bytes
    out.flops, out.bytes_accessed = _costs(compiled)
    groups = used_groups(lowered, args, batch)
    out.trainable_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    every = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out.model_flops = _model_flops(model, groups, len(devices), full=out.trainable_params == every)
    out.rows = sum(math.prod(g["input_ids"].shape[:2]) for g in groups)
    out.tokens = sum(math.prod(g["input_ids"].shape) for g in groups)
    return out


def judge(p: StepPlan, chip: Chip | None, capacity: float | None) -> StepPlan:
    """Fits (peak <= capacity) and the roofline bound max(FLOPs / peak, bytes / bandwidth).

    Both counts are lower bounds taken at their larger: XLA's cost analysis counts a while loop's
    body once (a scanned layer stack: one layer's work; unrolled it is the whole step), the model
    count leaves out remat and optimizer work; every argument is read and every output written at
    least once."""
    if capacity is not None:
        p.fits = p.peak_bytes <= capacity
    if chip is not None and not p.error:
        flops = max(p.flops, p.model_flops)
        moved = max(p.bytes_accessed, p.argument_bytes + p.output_bytes)
        compute, memory = flops / chip.peak_flops, moved / chip.hbm_bandwidth
        p.bound_s, p.bound_by = max(compute, memory), ("compute" if compute >= memory else "HBM bandwidth")
    return p


# ---------------------------------------------------------------------------------- candidates


def candidates(cfg: C.RunConfig, chips: int) -> list[tuple[str, list[str]]]:
    """Other settings to try when the step does not fit, one of each kind before the next of any:
    more tensor parallelism (activations split over more chips; 4 and 8 first), full remat (a
    layer's activations recomputed, not kept), micro-batches (``grad_accum``: the same step in
    smaller pieces). Each keeps every micro-batch divisible over data x fsdp."""
    data, tensor = max(cfg.mesh.data, 1), max(cfg.mesh.tensor, 1)
    micro, accum = cfg.train.batch_size // cfg.train.grad_accum, cfg.train.grad_accum

    def mesh_ok(t: int, m: int) -> bool:
        return chips % (data * t) == 0 and m % (data * (chips // (data * t))) == 0

    def mesh(t: int) -> list[str]:
        return [] if t == tensor else [f"mesh.fsdp={chips // (data * t)}", f"mesh.tensor={t}"]

    splits = [t for t in (4, 8, 2, 16) if t > tensor and mesh_ok(t, micro)]
    kinds: list[list[tuple[str, list[str]]]] = [
        [(f"fsdp {chips // (data * t)} x tensor {t}", mesh(t)) for t in splits]
    ]
    remat_full = cfg.model.remat == "full" or (cfg.model.remat in (None, "auto") and cfg.model.scan_layers)
    kinds.append([] if remat_full else [("remat full", ["model.remat=full"])])
    accums = []
    for factor in (2, 4, 8):
        m = cfg.train.batch_size // (accum * factor)
        ok = [t for t in (tensor, *splits) if cfg.train.batch_size % (accum * factor) == 0 and mesh_ok(t, m)]
        if ok:
            label = f"grad_accum {accum * factor}" + (f", tensor {ok[0]}" if ok[0] != tensor else "")
            accums.append((label, [f"train.grad_accum={accum * factor}", *mesh(ok[0])]))
    kinds.append(accums)
    longest = max(len(k) for k in kinds)
    return [k[i] for i in range(longest) for k in kinds if i < len(k)]


def _compose(cfg: C.RunConfig, overrides: list[str]) -> C.RunConfig:
    return C.compose([], overrides, base=C.to_dict(cfg))


def _attempt(cfg, hf, devices, target: Target, capacity, label, overrides, rows, *, strict=False) -> StepPlan:
    """Compile one configuration. The compiler running out of memory is a step that does not fit
    (fits False, the message kept); any other refusal is raised when ``strict`` (the configuration
    as given), else recorded (``error``) so that the search goes on."""
    try:
        p = compile_step(cfg, hf, devices, rows=rows)
    except SgaJaxError as e:
        if strict:
            raise
        p = StepPlan(label, overrides, {}, error=" ".join(str(e).split()))
    except Exception as e:  # XLA's own refusal, e.g. RESOURCE_EXHAUSTED: the program exceeds HBM
        message = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if strict and not _out_of_memory(message):
            raise ConfigError(f"the step does not compile for {target.text}: {message}") from None
        p = StepPlan(label, overrides, {}, error=message)
    p.label, p.overrides = label, overrides
    p = judge(p, target.chip, capacity)
    if p.error and _out_of_memory(p.error):
        p.fits = False
    return p


def _out_of_memory(message: str) -> bool:
    return any(s in message for s in ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory"))


def plan(
    cfg: C.RunConfig,
    target: Target | str,
    *,
    hbm_bytes: float | None = None,
    search: bool = True,
    max_candidates: int = 4,
    rows: int = 400,
) -> dict[str, Any]:
    """Compile ``cfg``'s step for ``target``; when it does not fit (and ``search``) try up to
    ``max_candidates`` other settings. Returns the report (:func:`format_report` prints it)."""
    import jax

    target = parse_target(target) if isinstance(target, str) else target
    devices = target_devices(target)
    hf, source = model_config(cfg)
    cfg = with_mesh(cfg)
    capacity = hbm_bytes if hbm_bytes is not None else (target.chip.hbm_bytes if target.chip else None)
    first = _attempt(cfg, hf, devices, target, capacity, "as configured", [], rows, strict=True)
    tried: list[StepPlan] = []
    if search and first.fits is False:
        for label, overrides in candidates(cfg, target.chips)[:max_candidates]:
            tried.append(
                _attempt(_compose(cfg, overrides), hf, devices, target, capacity, label, overrides, rows)
            )
    fitting = [p for p in tried if p.fits]
    best = min(fitting, key=lambda p: (p.bound_s or 0.0, p.peak_bytes)) if fitting else None
    return {
        "target": dataclasses.asdict(target),
        "device_kind": devices[0].device_kind,
        "capacity_bytes": capacity,
        "model": source,
        "config": _summary(cfg),
        "versions": _versions(jax),
        "plan": dataclasses.asdict(first),
        "candidates": [dataclasses.asdict(p) for p in tried],
        "suggestion": None if best is None else dataclasses.asdict(best),
    }


def _summary(cfg: C.RunConfig) -> dict[str, Any]:
    m, t = cfg.model, cfg.train
    return {
        "mode": cfg.mode, "method": cfg.method.name, "k": getattr(cfg.method, "k", None),
        "batch_size": t.batch_size, "grad_accum": t.grad_accum, "max_length": cfg.data.max_length,
        "dtype": m.dtype, "param_dtype": m.param_dtype, "scan_layers": m.scan_layers, "remat": m.remat,
        "attention": m.attention, "lora": None if m.lora is None else dataclasses.asdict(m.lora),
        "mesh": dataclasses.asdict(cfg.mesh),
    }  # fmt: skip


def _versions(jax) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"jax": jax.__version__}
    for name in ("jaxlib", "libtpu", "jax-cuda12-plugin", "flax"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
