"""Per-device memory of the SGA training step from XLA's own buffer assignment, without weights.

The step is the one `sga-jax train` runs: B forget rows x K rows (1 forget + K-1 normal) of T tokens,
the per-row token-mean NLL through the chunked log-prob kernel, the SGA loss (r = -0.8), its
gradient and a donated AdamW update; bfloat16 compute over float32 master parameters and float32
Adam moments (``model.dtype=bfloat16, model.param_dtype=float32``). Parameters, optimizer state and
batch are abstract (``nnx.eval_shape`` / ``jax.ShapeDtypeStruct`` with their NamedShardings from
``sga_jax.models.sharding``), so a 70B step is compiled on a laptop; ``compiled.memory_analysis()``
then gives, per device, the arguments (parameters + Adam state + batch), outputs, donated aliases and
XLA's temporary buffers. Peak = arguments + outputs - aliased + temporaries.

Each configuration compiles in its own child process with ``jax_num_cpu_devices`` set to the mesh
size (simulated CPU devices: the SPMD partitioning is the real one; CPU buffer sizes of bfloat16
work can differ from a GPU's / TPU's, see docs/scaling.md).

    python benchmarks/scaling_memory.py --table remat      # docs/performance.md: scan x remat policy
    python benchmarks/scaling_memory.py --table scaling    # docs/scaling.md: 7B / 13B / 70B x meshes
    python benchmarks/scaling_memory.py --one '{"model": "llama2-7b", "fsdp": 8, ...}'   # one row
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

_LLAMA = dict(model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPES = {
    # A small Llama for the remat table (GQA, the TinyLlama proportions at 1/4 width).
    "llama-small": dict(
        _LLAMA, vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2,
    ),
    # Llama 2 (Touvron et al. 2023, arXiv 2307.09288, table 1 / the HF configs).
    "llama2-7b": dict(
        _LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    ),
    "llama2-13b": dict(
        _LLAMA, vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40,
    ),
    "llama2-70b": dict(
        _LLAMA, vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8,
    ),
}  # fmt: skip

DEFAULTS = dict(
    model="llama-small", layers=0, data=1, fsdp=1, tensor=1, rows_per_shard=4, k=4, seq=512,
    dtype="bfloat16", param_dtype="float32", scan=True, remat=None, attention="xla",
)  # fmt: skip


def n_params(cfg: dict) -> int:
    d, L, V, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = d // cfg["num_attention_heads"]
    attn = (
        d * hd * (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
        + hd * cfg["num_attention_heads"] * d
    )
    return L * (attn + 3 * d * ff + 2 * d) + 2 * V * d + d


# -------------------------------------------------------------------------------------------- child


def measure(spec: dict) -> dict:
    """Compile one configuration on abstract arrays; XLA's per-device memory analysis in bytes."""
    spec = {**DEFAULTS, **spec}
    devices = spec["data"] * spec["fsdp"] * spec["tensor"]
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sga_jax import logprobs, objectives
    from sga_jax.models import from_config
    from sga_jax.models import sharding as S

    cfg = dict(SHAPES[spec["model"]])
    if spec["layers"]:
        cfg["num_hidden_layers"] = spec["layers"]
    rows = spec["rows_per_shard"] * spec["data"] * spec["fsdp"]
    k, seq = spec["k"], spec["seq"]
    assert rows % k == 0, "rows must be whole groups of K"
    mesh = S.make_mesh(spec["data"], spec["fsdp"], spec["tensor"], devices=jax.devices()[:devices])

    model = nnx.eval_shape(
        lambda: from_config(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=spec["dtype"],
            param_dtype=spec["param_dtype"],
            scan_layers=spec["scan"],
            remat=spec["remat"],
            attention=spec["attention"],
        )
    )
    shardings = S.model_shardings(model, mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat_sh = dict(nnx.to_flat_state(shardings))

    def with_sharding(state):
        flat = [
            (path, var.replace(jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype,
                                                    sharding=flat_sh[path])))
            for path, var in nnx.to_flat_state(state)
        ]  # fmt: skip
        return nnx.from_flat_state(flat)

    params, rest = with_sharding(params), with_sharding(rest)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_shape = jax.eval_shape(tx.init, params)
    # Adam's moments mirror the parameters (the runner's tx.init on sharded parameters keeps their
    # shardings); the step count and other scalars are replicated.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_def = jax.tree.structure(params)
    p_sh = [x.sharding for x in jax.tree.leaves(params)]

    def place(sub):
        if jax.tree.structure(sub) == p_def:
            leaves = jax.tree.leaves(sub)
            return jax.tree.unflatten(
                p_def, [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(leaves, p_sh)]
            )
        return jax.ShapeDtypeStruct(sub.shape, sub.dtype, sharding=replicated)

    is_group = lambda x: isinstance(x, jax.ShapeDtypeStruct) or jax.tree.structure(x) == p_def
    opt_state = jax.tree.map(place, opt_shape, is_leaf=is_group)
    batch_sh = S.batch_sharding(mesh)
    batch = {
        key: jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=batch_sh)
        for key in ("input_ids", "attention_mask", "loss_mask")
    }

    def loss_fn(p, r, b):
        m = nnx.merge(graphdef, p, r)
        nll = logprobs.sequence_nll(m, b).reshape(rows // k, k)
        return objectives.sga_loss(nll[:, 0], nll[:, 1:], -0.8)

    def train_step(p, s, r, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, r, b)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    t0 = time.perf_counter()
    lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, rest, batch)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return dict(
        spec=spec,
        layers=cfg["num_hidden_layers"],
        params=n_params(cfg),
        rows=rows,
        devices=devices,
        compile_s=seconds,
        jax=jax.__version__,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        **out,
    )


def _child(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec={**DEFAULTS, **spec}, error=f"compile did not finish in {timeout} s")
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        return dict(spec={**DEFAULTS, **spec}, error=last)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- tables

GiB = 2**30


def launch_command(spec: dict) -> str:
    """The command that runs this row's step (PATH: an HF directory of that shape; on a multi-host
    TPU slice every worker runs it with SGA_JAX_DISTRIBUTED=1, docs/performance.md)."""
    spec = {**DEFAULTS, **spec}
    remat = "null" if spec["remat"] is None else spec["remat"]
    forget_rows = spec["rows_per_shard"] * spec["data"] * spec["fsdp"] // spec["k"]
    return (
        f"sga-jax unlearn --config configs/experiment/tofu_sga.yaml model.path=PATH "
        f"model.dtype={spec['dtype']} model.param_dtype={spec['param_dtype']} "
        f"model.scan_layers={str(spec['scan']).lower()} model.remat={remat} "
        f"mesh.data={spec['data']} mesh.fsdp={spec['fsdp']} mesh.tensor={spec['tensor']} "
        f"train.batch_size={forget_rows} train.grad_accum=1 method.k={spec['k']} "
        f"data.max_length={spec['seq']}"
    )


def remat_table(timeout: int) -> tuple[list[dict], list[str]]:
    base = dict(model="llama-small", rows_per_shard=8)
    variants = [
        ("unrolled, no remat", dict(scan=False, remat="none")),
        ("scan, no remat", dict(scan=True, remat="none")),
    ] + [
        (f"scan, remat={name}", dict(scan=True, remat=name))
        for name in ("full", "minimal", "dots", "everything")
    ]
    results, lines = [], []
    for label, v in variants:
        r = _child({**base, **v}, timeout)
        r["label"] = label
        results.append(r)
        print(json.dumps(r), flush=True)
    unrolled = results[0].get("temp_bytes")
    lines += [
        "| variant | temporaries (MiB) | vs unrolled | arguments (MiB) | peak (MiB) | compile (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | |")
            continue
        rel = f"{r['temp_bytes'] / unrolled:.2f}x" if unrolled else "n/a"
        lines.append(
            f"| {r['label']} | {r['temp_bytes'] / 2**20:.1f} | {rel} | {r['argument_bytes'] / 2**20:.1f} "
            f"| {r['peak_bytes'] / 2**20:.1f} | {r['compile_s']:.1f} |"
        )
    return results, lines


MESHES = {
    "8 x H100 (80 GB)": [(8, 1), (4, 2), (2, 4), (1, 8)],
    "TPU v5e-64 (16 GB/chip)": [(64, 1), (16, 4), (8, 8)],
    "TPU v5p-128 (95 GB/chip)": [(128, 1), (32, 4), (16, 8)],
}


def scaling_table(
    timeout: int, models: list[str], layers: dict[str, list[int]]
) -> tuple[list[dict], list[str]]:
    results, lines = [], []
    lines += [
        "| model | layers compiled | platform | fsdp x tensor | rows (x 512 tokens) | params+Adam (GiB/dev) "
        "| temporaries (GiB/dev) | peak (GiB/dev) | compile (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in models:
        for platform_name, meshes in MESHES.items():
            for fsdp, tensor in meshes:
                for n in layers.get(model, [0]):
                    spec = dict(model=model, fsdp=fsdp, tensor=tensor, layers=n)
                    r = _child(spec, timeout)
                    r["platform"] = platform_name
                    r["launch"] = launch_command(spec)
                    results.append(r)
                    print(json.dumps(r), flush=True)
                    if "error" in r:
                        lines.append(
                            f"| {model} | {n or 'all'} | {platform_name} | {fsdp} x {tensor} | "
                            f"| failed: {r['error']} | | | |"
                        )
                        continue
                    lines.append(
                        f"| {model} | {r['layers']} | {platform_name} | {fsdp} x {tensor} | {r['rows']} "
                        f"| {(r['argument_bytes'] - 3 * r['rows'] * 512 * 4 / r['devices']) / GiB:.2f} "
                        f"| {r['temp_bytes'] / GiB:.2f} | {r['peak_bytes'] / GiB:.2f} "
                        f"| {r['compile_s']:.0f} |"
                    )
    return results, lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", choices=["remat", "scaling"], default=None)
    p.add_argument("--one", default=None, help="one configuration as JSON (prints one JSON line)")
    p.add_argument("--models", nargs="*", default=["llama2-7b", "llama2-13b", "llama2-70b"])
    p.add_argument(
        "--layers",
        default="{}",
        help='JSON: model -> layer counts to compile instead of the full depth, e.g. {"llama2-70b": [4, 8]}',
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    if args.table is None:
        p.error("give --table remat|scaling or --one JSON")
    started = _dt.datetime.now().isoformat(timespec="seconds")
    if args.table == "remat":
        results, lines = remat_table(args.timeout)
    else:
        results, lines = scaling_table(args.timeout, args.models, json.loads(args.layers))
    record = dict(
        date=_dt.date.today().isoformat(),
        started=started,
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        devices=sorted({f"{r.get('backend')}: {r.get('device')}" for r in results if "backend" in r}),
        python=platform.python_version(),
        gpu=(
            "GPU/TPU memory still to be measured on the hardware: no GPU was lent to this "
            "session (2026-11-26)"
        ),
        results=results,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{args.table}_memory"
    tmp = RESULTS / f".{tag}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(RESULTS / f"{tag}.json")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
