"""LoRA adapters on the ports' projections (Hu et al. 2021, arXiv 2106.09685), PEFT-compatible.

``apply_lora(model, LoRAConfig(rank=16, alpha=32, targets=["q_proj", "v_proj"]))`` attaches to every
:class:`~sga_jax.models.layers.Linear` whose HF module name ends in one of ``targets`` an adapter
``y = W x + (alpha / r) · B A x`` (``Linear.__call__`` adds it). The adapter's two matmuls are
themselves ``Linear`` modules (``lora_a``: ``[in, r]``, ``lora_b``: ``[r, out]``) whose kernels are
:class:`LoRAParam`, a subclass of ``nnx.Param``: the trainer selects them by type (only they are
trained and held in the optimizer state) and K-FAC sees them as two dense layers (docs/interfaces.md,
"LoRA"). Initialisation as PEFT's default (``peft/tuners/lora/layer.py``, ``reset_lora_parameters``
with ``init_lora_weights=True``): A kaiming-uniform with ``a = √5`` (uniform in ``±1/√in``), B zero, so
a fresh adapter leaves the model unchanged. Stacked (``scan_layers``) projections get stacked
adapters ``[L, in, r]`` / ``[L, r, out]``.

Export: :func:`sga_jax.models.hf.save_model` writes the merged weights ``W + (alpha/r) · A B`` (a plain
HF checkpoint); :func:`save_adapter` writes PEFT's layout (``adapter_config.json`` +
``adapter_model.safetensors`` with ``base_model.model.<hf module>.lora_A.weight [r, in]`` and
``.lora_B.weight [out, r]``), which ``peft.PeftModel.from_pretrained`` loads; :func:`load_adapter`
reads it back. Phi-3's HF checkpoints fuse q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``): our
port holds them apart, so adapters on the parts train and merge normally, but they have no PEFT
form on the fused HF module and :func:`save_adapter` refuses them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sga_jax.config import LORA_TARGETS, LoRAConfig
from sga_jax.errors import ConfigError, ModelLoadError
from sga_jax.fsutil import (
    PARTIAL_MARKER,
    check_destination,
    mark_partial,
    ordinary_file_mode,
    remove_stale_partials,
    write_marker,
)
from sga_jax.models import layers as L
from sga_jax.models.sources import template

Array = jax.Array
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRAParam(nnx.Param):
    """An adapter weight: with adapters attached, the only trainable parameters."""


class LoRALinear(L.Linear):
    """One adapter matmul ``x @ kernel`` (no bias) whose kernel is a :class:`LoRAParam`."""

    def __init__(self, kernel: Array, *, dtype: Any):
        self.in_features = int(kernel.shape[-2])
        self.out_features = int(kernel.shape[-1])
        self.dtype = dtype
        self.kfac_tap = False
        self.kernel = LoRAParam(kernel)
        self.bias = None


class LoRA(nnx.Module):
    """``(alpha / rank) · lora_b(lora_a(dropout(x)))``; dropout only where built with a rate and
    rngs and switched on (``nnx.Dropout``, deterministic by default)."""

    def __init__(
        self,
        a: Array,
        b: Array,
        *,
        alpha: float,
        dtype: Any,
        dropout: float = 0.0,
        rngs: nnx.Rngs | None = None,
    ):
        self.rank = int(a.shape[-1])
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.dropout_rate = float(dropout)
        self.lora_a = LoRALinear(a, dtype=dtype)
        self.lora_b = LoRALinear(b, dtype=dtype)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: Array) -> Array:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.lora_b(self.lora_a(x)) * jnp.asarray(self.scale, x.dtype)

    def delta(self) -> Array:
        """``(alpha / rank) · A B`` in float32, ``[in, out]`` (stacked: ``[L, in, out]``)."""
        a = self.lora_a.kernel.get_value().astype(jnp.float32)
        b = self.lora_b.kernel.get_value().astype(jnp.float32)
        return jnp.matmul(a, b) * self.scale


# --------------------------------------------------------------------------------- naming


def _hf_module(model, path: tuple) -> tuple[str, bool]:
    """``(HF module name, stacked?)`` of the Linear at ``path``; stacked names keep ``{i}``."""
    tmpl = _hf_template(model, path)
    index = next((p for p in path if isinstance(p, int)), None)
    stacked = "{i}" in tmpl and index is None
    return (tmpl if index is None else tmpl.replace("{i}", str(index))), stacked


def _hf_template(model, path: tuple) -> str:
    """The HF module name of the Linear at ``path`` with ``{i}`` for the layer index."""
    tmpl = template((*path, "kernel"))[0]
    entry = type(model).HF_NAMES.get(tmpl)
    if entry is None:
        raise ModelLoadError(f"no HF name for module parameter {tmpl}")
    return entry[0].removesuffix(".weight")


def _linears(model) -> list[tuple[tuple, L.Linear]]:
    return [
        (tuple(path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, L.Linear) and not isinstance(node, LoRALinear)
    ]


def adapters(model) -> dict[tuple, L.Linear]:
    """Module path -> the Linear, for every Linear of ``model`` that carries adapters."""
    return {path: lin for path, lin in _linears(model) if lin.lora is not None}


def has_lora(model) -> bool:
    return bool(adapters(model))


def lora_filter(model) -> Any:
    """The ``nnx`` filter of the trainable parameters: :class:`LoRAParam` when ``model`` carries
    adapters, else every ``nnx.Param``."""
    return LoRAParam if has_lora(model) else nnx.Param


# ------------------------------------------------------------------------------------- attach


def _kaiming_a(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
    # torch.nn.init.kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in.
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def apply_lora(
    model,
    config: LoRAConfig,
    rngs: nnx.Rngs | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dropout: float | None = None,
):
    """Attach adapters to ``model`` in place (and return it); cast the base parameters to
    ``config.base_dtype`` when set. Adapters are float32, replicated over ``mesh`` when given.
    ``dropout`` (Python API only; default ``config.dropout``) needs an unrolled model and ``rngs``.
    Raises ConfigError when a target matches no projection of the model or adapters exist already."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    dropout = config.dropout if dropout is None else float(dropout)
    unknown = sorted(set(config.targets) - set(LORA_TARGETS))
    if unknown:
        raise ConfigError(
            f"model.lora.targets: unknown projection {unknown[0]!r}; use some of {LORA_TARGETS}"
        )
    linears = _linears(model)
    if any(lin.lora is not None for _, lin in linears):
        raise ConfigError("the model already carries LoRA adapters")
    chosen, names = [], set()
    for path, lin in linears:
        hf_name, stacked = _hf_module(model, path)
        short = hf_name.rsplit(".", 1)[-1]
        names.add(short)
        if short in config.targets and "lm_head" not in path:
            chosen.append((path, lin, stacked))
    missing = sorted(set(config.targets) - {_hf_template(model, p).rsplit(".", 1)[-1] for p, _, _ in chosen})
    if missing:
        raise ConfigError(
            f"model.lora.targets: {missing[0]!r} names no projection of {model.config.model_type} "
            f"(its projections: {', '.join(sorted(names - {'lm_head'}))})"
        )
    if dropout > 0 and any(stacked for _, _, stacked in chosen):
        raise ConfigError("LoRA dropout needs an unrolled model (model.scan_layers=false)")
    _check_rank_and_scale(config, [lin for _, lin, _ in chosen])
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for _, lin, _ in chosen:
        kernel = lin.kernel.get_value()
        lead, (n_in, n_out) = kernel.shape[:-2], kernel.shape[-2:]
        a = _kaiming_a(rngs.params(), (*lead, n_in, config.rank), n_in)
        b = jnp.zeros((*lead, config.rank, n_out), jnp.float32)
        if replicated is not None:
            a, b = jax.device_put(a, replicated), jax.device_put(b, replicated)
        lin.lora = LoRA(a, b, alpha=config.alpha, dtype=lin.dtype, dropout=dropout, rngs=rngs)
    if config.base_dtype is not None:
        dt = L.as_dtype(config.base_dtype)
        for _, var in nnx.iter_graph(model):
            if isinstance(var, nnx.Param) and not isinstance(var, LoRAParam):
                var.set_value(var.get_value().astype(dt))
    return model


def _check_rank_and_scale(config: LoRAConfig, chosen: list[L.Linear]) -> None:
    """Before any allocation: a rank past a projection's sizes adds nothing, and a huge one (r: 1e9)
    would allocate hundreds of GB before failing; an alpha past float32's range makes every output
    inf or NaN."""
    smallest = min(min(lin.kernel.get_value().shape[-2:]) for lin in chosen)
    if config.rank > smallest:
        raise ConfigError(
            f"LoRA rank {config.rank} is larger than the smallest projection it adapts ({smallest}: "
            "min(in, out) of the targets); use a rank of at most that"
        )
    if not abs(config.alpha) <= float(np.finfo(np.float32).max):  # then so is alpha / r, r >= 1
        raise ConfigError(
            f"LoRA alpha {config.alpha:g} overflows float32 (with it the adapters' scale alpha / rank "
            "makes every output inf or NaN); use a smaller alpha"
        )


def merged_kernel(lin: L.Linear) -> Array:
    """``W + (alpha / r) · A B`` in ``W``'s dtype (``[in, out]``, stacked ``[L, in, out]``)."""
    w = lin.kernel.get_value()
    if lin.lora is None:
        return w
    return (w.astype(jnp.float32) + lin.lora.delta()).astype(w.dtype)


# ------------------------------------------------------------------------------------- PEFT


def _peft_tensors(model) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """PEFT's tensors (``[r, in]`` / ``[out, r]``) and the config fields they imply."""
    fused_parts = _fused_part_names(model)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas, dropouts, targets = set(), set(), set(), set()
    for path, lin in adapters(model).items():
        hf_name, stacked = _hf_module(model, path)
        if _hf_template(model, path) + ".weight" in fused_parts:
            raise ConfigError(
                f"adapter on {hf_name.rsplit('.', 1)[-1]}: {model.config.model_type}'s HF checkpoints fuse "
                "this projection with others, so it has no PEFT adapter form; export it merged "
                "(model.lora.save=merged)"
            )
        lo = lin.lora
        ranks.add(lo.rank), alphas.add(lo.alpha), dropouts.add(lo.dropout_rate)
        targets.add(hf_name.rsplit(".", 1)[-1])
        a = np.asarray(jax.device_get(lo.lora_a.kernel.get_value()), np.float32)
        b = np.asarray(jax.device_get(lo.lora_b.kernel.get_value()), np.float32)
        layers = range(a.shape[0]) if stacked else [None]
        for i in layers:
            name = PEFT_PREFIX + (hf_name.format(i=i) if i is not None else hf_name)
            ai, bi = (a[i], b[i]) if i is not None else (a, b)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)  # [r, in]
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)  # [out, r]
    if not tensors:
        raise ConfigError("the model carries no LoRA adapters to save")
    if len(ranks) != 1 or len(alphas) != 1:
        raise ConfigError("save_adapter needs one rank and one alpha for every adapter")
    return tensors, dict(r=ranks.pop(), alpha=alphas.pop(), dropout=max(dropouts), targets=sorted(targets))


def _fused_part_names(model) -> set[str]:
    fused = getattr(type(model), "HF_FUSED", None) or {}
    return {part for parts in fused.values() for part in parts}


def adapter_config(model, *, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` of the model's adapters (PEFT's ``LoraConfig`` fields)."""
    _, info = _peft_tensors(model)
    return _config_json(model, info, base_model_name_or_path)


def _config_json(model, info: dict[str, Any], base: str | None) -> dict[str, Any]:
    if base is None:
        base = model.config.hf.get("_name_or_path")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": info["r"],
        "lora_alpha": info["alpha"],
        "target_modules": info["targets"],
        "lora_dropout": info["dropout"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": None if base is None else str(base),
    }


def peft_files(
    model, base_model_name_or_path: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config.json dict, PEFT-named tensors)`` of the model's adapters (ConfigError when
    it has none or they have no PEFT form)."""
    tensors, info = _peft_tensors(model)
    return _config_json(model, info, base_model_name_or_path), tensors


def write_peft(files: tuple[dict[str, Any], dict[str, np.ndarray]], folder: Path) -> None:
    """Write :func:`peft_files` into ``folder`` (created)."""
    cfg, tensors = files
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    ordinary_file_mode(folder / ADAPTER_WEIGHTS)  # safetensors writes 0600: the user's umask instead


def save_adapter(
    model,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters alone in PEFT's layout to ``out_dir`` (a temporary folder renamed into
    place: complete or absent). ``base_model_name_or_path`` defaults to the model's source path. The
    same destination rules as ``save_model``: new, empty, a previous export, or ``overwrite``."""
    src = model.config.hf.get("_name_or_path")
    out = check_destination(Path(out_dir).expanduser(), sources=(src,), overwrite=overwrite)
    files = peft_files(model, base_model_name_or_path)  # refuses before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; an export is an ordinary folder
        mark_partial(tmp)
        write_peft(files, tmp)
        write_marker(tmp)
        (tmp / PARTIAL_MARKER).unlink()
        if out.exists():
            check_destination(out, sources=(src,), overwrite=overwrite)
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _number(cfg: dict, key: str, cfg_file: Path, *, whole: bool = False, default: Any = None) -> Any:
    """``cfg[key]`` checked to be a finite JSON number (an integer when ``whole``)."""
    if key not in cfg and default is None:
        raise ModelLoadError(f"{cfg_file}: missing {key!r}")
    v = cfg.get(key, default)
    v = default if v is None and default is not None else v
    kinds = int if whole else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or not math.isfinite(v):
        want = "a whole number" if whole else "a finite number"
        raise ModelLoadError(f"{cfg_file}: {key}={v!r} must be {want}")
    return v


def _read_adapter_config(cfg_file: Path) -> tuple[LoRAConfig, float]:
    """``(LoRAConfig, dropout)`` of a PEFT ``adapter_config.json``, refusing (one line) what our
    adapters cannot represent and values of the wrong type (``r: 4.9``, ``lora_alpha: Infinity``)."""
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ModelLoadError(f"{cfg_file}: peft_type must be LORA")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise ModelLoadError(f"{cfg_file}: {key}={cfg.get(key)!r} is not supported (only {ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if cfg.get(key):
            raise ModelLoadError(f"{cfg_file}: {key} is not supported")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ModelLoadError(f"{cfg_file}: target_modules must be a list of module names")
    rank = _number(cfg, "r", cfg_file, whole=True)
    alpha = _number(cfg, "lora_alpha", cfg_file)
    dropout = _number(cfg, "lora_dropout", cfg_file, default=0.0)
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ModelLoadError(
            f"{cfg_file}: r={rank!r}, lora_alpha={alpha!r}, lora_dropout={dropout!r}: "
            "r must be >= 1, lora_alpha > 0, lora_dropout in [0, 1)"
        )
    try:
        lcfg = LoRAConfig(rank=rank, alpha=float(alpha), targets=list(targets))
    except ConfigError as e:
        raise ModelLoadError(f"{cfg_file}: {e}") from None
    return lcfg, float(dropout)


# What PEFT stores adapters as (a half-precision model saves them in its dtype).
_FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))


def _adapter_tensor(h, name: str, weights: Path) -> np.ndarray:
    """One stored adapter tensor, refused unless it is floating point and finite."""
    try:
        t = h.get_tensor(name)
    except Exception as e:  # a damaged file or a dtype numpy cannot hold
        raise ModelLoadError(f"{weights}: cannot read {name!r}: {' '.join(str(e).split())}") from None
    if t.dtype not in _FLOAT_DTYPES:  # bfloat16 is numpy's void kind: a kind test would refuse it
        raise ModelLoadError(f"{weights}: {name!r} is stored as {t.dtype}; adapter weights are floats")
    if not np.isfinite(t).all():
        raise ModelLoadError(f"{weights}: {name!r} holds NaN or inf")
    return t


def load_adapter(model, adapter_dir: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None):
    """Attach the PEFT LoRA adapter in ``adapter_dir`` to ``model`` (in place; returned). Refuses,
    with one line, what our adapters cannot represent (DoRA, rsLoRA, per-module ranks, biases,
    regex targets), any tensor that is missing, extra, of the wrong shape, not floating point or not
    finite, and a damaged file; a refused load leaves the model without adapters."""
    d = Path(adapter_dir).expanduser()
    cfg_file, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ModelLoadError(f"no {f.name} in {d}")
    lcfg, dropout = _read_adapter_config(cfg_file)
    try:
        h = safe_open(str(weights), framework="numpy")
    except Exception as e:  # SafetensorError: a broken header
        raise ModelLoadError(
            f"{weights} is not a readable safetensors file: {' '.join(str(e).split())}"
        ) from None
    try:
        apply_lora(model, lcfg, mesh=mesh)  # checks the rank and scale before allocating
    except ConfigError as e:
        raise ModelLoadError(f"{cfg_file}: {e}") from None
    try:
        for lin in adapters(model).values():
            lin.lora.dropout_rate = dropout
        with h:
            _fill_adapters(model, h, weights, mesh)
        _check_deltas(model, cfg_file)
    except BaseException:
        for lin in adapters(model).values():  # no half-loaded adapters left on the user's model
            lin.lora = None
        raise
    return model


def _check_deltas(model, cfg_file: Path) -> None:
    """Refuse finite adapters whose update ``(alpha / r) · A B`` is not finite in float32 (huge
    values or alpha): a NaN model otherwise. The bound ``scale · r · max|A| · max|B|`` clears almost
    every adapter without forming the product; only one past float32's range is multiplied out."""
    limit = float(np.finfo(np.float32).max)
    for path, lin in adapters(model).items():
        lo = lin.lora
        a_max = float(jnp.max(jnp.abs(lo.lora_a.kernel.get_value())))
        b_max = float(jnp.max(jnp.abs(lo.lora_b.kernel.get_value())))
        if lo.scale * lo.rank * a_max * b_max < limit or bool(jnp.isfinite(lo.delta()).all()):
            continue
        name = _hf_module(model, path)[0].replace("{i}", "*")
        raise ModelLoadError(
            f"{cfg_file.parent}: the adapter of {name} gives an update (lora_alpha / r) · B A that "
            f"overflows float32 (lora_alpha={lo.alpha:g}, r={lo.rank}); it would make the model NaN"
        )


def _fill_adapters(model, h, weights: Path, mesh) -> None:
    stored = set(h.keys())
    used: set[str] = set()
    for path, lin in adapters(model).items():
        hf_name, stacked = _hf_module(model, path)
        for part, sub in (("lora_A", lin.lora.lora_a), ("lora_B", lin.lora.lora_b)):
            var = sub.kernel
            shape = var.get_value().shape
            layers = range(shape[0]) if stacked else [None]
            values = []
            for i in layers:
                name = f"{PEFT_PREFIX}{hf_name.format(i=i) if i is not None else hf_name}.{part}.weight"
                if name not in stored:
                    raise ModelLoadError(f"{weights}: missing tensor {name!r}")
                t = _adapter_tensor(h, name, weights).T
                want = shape[1:] if stacked else shape
                if tuple(t.shape) != tuple(want):
                    raise ModelLoadError(f"{weights}: {name!r} has shape {t.T.shape}, expected {want[::-1]}")
                values.append(np.asarray(t, np.float32))
                used.add(name)
            value = jnp.asarray(np.stack(values) if stacked else values[0])
            if mesh is not None:
                value = jax.device_put(value, var.get_value().sharding)
            var.set_value(value)
    extra = sorted(stored - used)
    if extra:
        raise ModelLoadError(
            f"{weights}: {len(extra)} tensors match no adapter of this model (e.g. {extra[0]!r})"
        )


__all__ = [
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "LoRAParam",
    "adapter_config",
    "adapters",
    "apply_lora",
    "has_lora",
    "load_adapter",
    "lora_filter",
    "merged_kernel",
    "peft_files",
    "save_adapter",
    "write_peft",
]
