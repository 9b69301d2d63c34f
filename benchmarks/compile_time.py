"""First-step compile time of the SGA train step, with and without scan over layers.

The step is the one of benchmarks/step_vs_torch.py (B forget rows x K rows x T tokens, chunked
log-prob kernel, SGA loss, AdamW, donated state). It is traced, lowered and compiled from abstract
shapes (no weights are built), each variant in a fresh child process so that no in-memory JAX cache
is shared. Default: SmolLM2-135M's shape (30 layers, d = 576).

    python benchmarks/compile_time.py                  # 30 layers, scan and unrolled
    python benchmarks/compile_time.py --layers 30 60 --hidden 256

Results: benchmarks/results/compile_time_<backend>.{json,md}.
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
GPU_NOTE = "not run — no GPU was lent to this task"
GPU_COMMAND = (
    "python benchmarks/compile_time.py --hidden 2048 --intermediate 5632 --vocab 32000 "
    "--layers 22 --dtype bfloat16"
)


def _config(args, layers: int) -> dict:
    heads = max(1, args.hidden // 64)
    return dict(
        model_type="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 3) if heads % 3 == 0 else heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def child(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sga_jax import logprobs, objectives
    from sga_jax.models import from_config

    cfg = _config(args, args.layers[0])
    t0 = time.perf_counter()
    abstract = nnx.eval_shape(
        lambda: from_config(
            cfg, rngs=nnx.Rngs(0), dtype=args.dtype, param_dtype="float32", scan_layers=args.scan
        )
    )
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = jax.eval_shape(tx.init, params)
    rows = args.batch * args.k
    batch = {
        k: jax.ShapeDtypeStruct((rows, args.seq), jnp.int32)
        for k in ("input_ids", "attention_mask", "loss_mask")
    }

    def loss_fn(p, batch):
        m = nnx.merge(graphdef, p, rest)
        nll = logprobs.sequence_nll(m, batch).reshape(args.batch, args.k)
        return objectives.sga_loss(nll[:, 0], nll[:, 1:], -0.8)

    def step(p, s, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    hlo_ops = lowered.as_text().count("\n")
    mem = compiled.memory_analysis()
    return dict(
        layers=args.layers[0],
        scan=args.scan,
        trace_and_lower_s=lower_s,
        compile_s=compile_s,
        total_s=lower_s + compile_s,
        setup_s=setup_s,
        stablehlo_lines=hlo_ops,
        temp_bytes=getattr(mem, "temp_size_in_bytes", None) if mem is not None else None,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[30])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--scan", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", default=None, help="results file suffix (default: the JAX backend)")
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return 0

    # The parent only reads the backend's name: on a GPU it must not hold device memory meanwhile.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jaxlib

    runs = []
    for layers in args.layers:
        for scan in (True, False):
            cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--hidden", str(args.hidden),
                   "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
                   "--batch", str(args.batch), "--k", str(args.k), "--seq", str(args.seq),
                   "--dtype", args.dtype]  # fmt: skip
            if scan:
                cmd.append("--scan")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                runs.append(dict(layers=layers, scan=scan, error=proc.stderr.strip().splitlines()[-1]))
            else:
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind if backend != "cpu" else f"cpu ({os.cpu_count()} cores)"
    load = os.getloadavg()
    record = dict(
        date=_dt.date.today().isoformat(),
        device=device,
        load_average=list(load),
        versions=dict(
            python=platform.python_version(),
            jax=jax.__version__,
            jaxlib=jaxlib.__version__,
            flax=__import__("flax").__version__,
        ),  # fmt: skip
        setup=dict(
            hidden=args.hidden,
            intermediate=args.intermediate,
            vocab=args.vocab,
            B=args.batch,
            K=args.k,
            T=args.seq,
            dtype=args.dtype,
        ),  # fmt: skip
        runs=runs,
    )
    tag = args.tag or backend
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"compile_time_{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# First-step compile time of the SGA train step — {device}, {record['date']}",
        "",
        f"Llama, d={args.hidden}, d_ff={args.intermediate}, V={args.vocab}, {args.dtype}; step on "
        f"B={args.batch} x K={args.k} rows x T={args.seq} "
        "(chunked log-probs, SGA loss, AdamW, donated state). "
        "Traced, lowered and compiled from abstract shapes in a fresh process per row. "
        f"Load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        "",
        "| layers | scan over layers | trace + lower (s) | XLA compile (s) | total (s) | StableHLO lines |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['layers']} | {r['scan']} | failed: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['layers']} | {'yes' if r['scan'] else 'no (unrolled)'} | {r['trace_and_lower_s']:.1f} "
            f"| {r['compile_s']:.1f} | {r['total_s']:.1f} | {r['stablehlo_lines']} |"
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items())]
    if backend == "cpu":
        lines += ["", f"GPU: {GPU_NOTE}. GPU command: `{GPU_COMMAND}`."]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"compile_time_{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
